"""Reading a model folder: where the weights are, config.json, lazily loaded tensors, a content hash.

A model folder is HF-format: ``config.json``, ``model*.safetensors`` (one file or mlx-lm/HF shards) and tokenizer
files. Every error names the file and what is wrong (``ModelError``).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import mlx.core as mx

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model")


class ModelError(RuntimeError):
    """A model that cannot be opened: missing path, unsupported architecture, corrupt or missing tensors."""


def cache_dir() -> Path:
    root = os.environ.get("MLX_HOLO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mlx-holo")
    return Path(root)


def weight_files(path: Path) -> list[Path]:
    return sorted(Path(path).glob("model*.safetensors"))


def read_config(path: Path) -> dict:
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        raise ModelError(f"{path} has no config.json: not an HF-format model folder")
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ModelError(f"{cfg} is not valid JSON: {type(e).__name__}: {e}") from None
    if not isinstance(config, dict):
        raise ModelError(f"{cfg} holds a JSON {type(config).__name__}, not a config object")
    return config


def load_weights(path: Path) -> dict[str, mx.array]:
    """All tensors of a folder, lazily. Corrupt or missing files raise ModelError naming the file."""
    files = weight_files(path)
    if not files:
        raise ModelError(f"{path} has no model*.safetensors weight files")
    weights = {}
    for f in files:
        weights.update(load_file(f))
    return weights


def load_file(f: Path) -> dict[str, mx.array]:
    """One safetensors file's tensors, lazily; a corrupt file raises ModelError naming it."""
    try:
        return mx.load(str(f))
    except Exception as e:  # noqa: BLE001 - mlx raises RuntimeError/ValueError on bad headers
        raise ModelError(f"corrupt safetensors file {f}: {e}") from e


def model_hash(path: Path) -> str:
    """sha256 over config.json and each weight file's name, size and first 1 MiB (header + leading data)."""
    h = hashlib.sha256((Path(path) / "config.json").read_bytes())
    for f in weight_files(path):
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
    return h.hexdigest()


def safetensors_header(f: str | Path) -> tuple[dict, int]:
    """A .safetensors file's header (tensor name -> {dtype, shape, data_offsets}; no tensor data read) and the
    offset its data starts at."""
    with open(f, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def tensor_extents(path: Path) -> dict[str, tuple[Path, int, int]]:
    """Every tensor of a folder's safetensors files -> (file, first byte, end byte), from the headers alone."""
    out = {}
    for f in weight_files(Path(path)):
        header, start = safetensors_header(f)
        for name, h in header.items():
            a, b = h["data_offsets"]
            out[name] = (f, start + a, start + b)
    return out


def reloader(path: Path):
    """-> reload(name): a fresh lazy array of the folder's tensor ``name`` (nothing read until it is evaluated), or
    None when no safetensors file of the folder holds it. Lets a caller drop a large tensor it has read (e.g. a
    vocabulary table needed only at the start and the end) and read it again later."""
    try:
        where = {name: f for name, (f, _, _) in tensor_extents(path).items()}
    except (OSError, ValueError, struct.error):
        where = {}

    def reload(name: str) -> mx.array | None:
        f = where.get(name)
        return None if f is None else load_file(f).get(name)
    return reload


def prefetcher(path: Path):
    """-> prefetch(prefix): ask the OS to start reading the tensors whose names start with ``prefix`` (e.g. the
    next block's, while this one is worked on), so that they come from memory when they are needed. A no-op where
    the OS offers no read-ahead advice (``os.posix_fadvise``) or the headers cannot be read."""
    if not hasattr(os, "posix_fadvise"):
        return lambda prefix: None
    try:
        extents = tensor_extents(path)
    except (OSError, ValueError, struct.error):
        return lambda prefix: None

    def prefetch(prefix: str) -> None:
        for name, (f, a, b) in extents.items():
            if name.startswith(prefix):
                try:
                    fd = os.open(f, os.O_RDONLY)
                    try:
                        os.posix_fadvise(fd, a, b - a, os.POSIX_FADV_WILLNEED)
                    finally:
                        os.close(fd)
                except OSError:
                    pass
    return prefetch

