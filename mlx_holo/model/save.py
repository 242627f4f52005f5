"""Writing model folders in mlx-lm's layout, atomically.

Saved models use mlx-lm's layout: ``config.json`` with a ``quantization`` block (default bits/group size plus
per-layer overrides, ``False`` for layers left in floating point) and ``model.safetensors`` with packed
``weight``/``scales``/``biases``; stock ``mlx_lm.load`` opens them. Everything is written into a temp folder beside
the destination (``atomic_dir``) that becomes the destination only when complete.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx

from ..evidence import file_stamp, sha256_file
from ..quant.formats import QuantizedWeight
from .files import TOKENIZER_FILES, ModelError, load_file, weight_files


def replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished temp folder into place; an existing folder (or file) is swapped out only after success."""
    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    else:
        os.rename(tmp, out)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(parent: Path, name: str) -> list[Path]:
    """Remove what a killed earlier run into ``parent/name`` left: its temp folder (``.NAME.tmp-PID-*``), a
    distributed rank's copy (``.NAME.rank-PID-*``) or the swapped-out old copy (``.NAME.old-PID``) of a process
    that no longer runs -> the paths removed."""
    removed = []
    for p in parent.glob(f".{name}.*"):
        rest = p.name[len(name) + 2:]
        kind, _, tail = rest.partition("-")
        pid = tail.split("-", 1)[0]
        if kind in ("tmp", "old", "rank") and pid.isdigit() and not _pid_alive(int(pid)):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def check_out(out: str | Path, overwrite: bool = False) -> Path:
    """Refuse an output path that cannot be written, before any work: an existing file or non-empty folder
    (without ``overwrite``), a parent that is a file or not writable."""
    out = Path(out)
    if out.exists() and not overwrite:
        if not out.is_dir():
            raise FileExistsError(f"{out} is an existing file (pass --overwrite to replace it)")
        if any(out.iterdir()):
            raise FileExistsError(f"{out} already exists and is not empty (pass --overwrite to replace it)")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise FileExistsError(f"cannot create {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FileExistsError(f"cannot create {out}: {parent} is not writable")
    return out


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False):
    """Yield a temp folder beside ``out``; on success it becomes ``out``, on any failure it is removed. What a killed
    earlier run left beside ``out`` is removed first (``clean_stale``) and said on stderr."""
    out = check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    for p in clean_stale(out.parent, out.name):
        print(f"note: removed {p}, left by an earlier run that was killed", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any other folder
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def rank_dir(out: str | Path, rank: int):
    """Yield a private temp folder beside ``out`` for rank ``rank`` > 0 of a distributed job (each rank writes its
    own copy of the output, which it evaluates its share of windows on); removed on exit, whatever happens."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.rank-{os.getpid()}-{rank}-", dir=out.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


SHARD_BYTES = 1 << 30  # a shard is written once this many bytes of finished tensors are pending
INDEX_FILE = "model.safetensors.index.json"


class FolderWriter:
    """Streams an mlx-lm folder into ``out`` (an existing, empty folder: see ``atomic_dir``) as tensors become final.

    ``add(floats, quantized)`` takes finished tensors -- floats: parameter path -> float tensor (stored in
    ``float_dtype``); quantized: module path -> QuantizedWeight (affine or one of MLX's float modes) -- and writes a
    shard whenever ``shard_bytes`` are pending, so finished blocks do not stay in memory. ``close`` writes the last
    shard, names the shards as mlx-lm does (``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` plus
    ``model.safetensors.index.json``), config.json with the ``quantization`` block (default bits/group size,
    per-layer overrides, ``False`` for layers kept float) and the tokenizer files of ``src``."""

    def __init__(self, out: str | Path, *, default_bits: int | None, default_group_size: int, mode: str = "affine",
                 float_dtype=mx.float16, shard_bytes: int = SHARD_BYTES):
        self.out, self.float_dtype, self.shard_bytes = Path(out), float_dtype, shard_bytes
        self.qcfg: dict = {"group_size": default_group_size, "bits": default_bits or 8, "mode": mode}
        self.nbytes = {"codes": 0, "scales_biases": 0, "other": 0}
        self.n_quant_params = 0  # weights stored quantized (for bits/weight)
        self.any_quantized = False
        self.pending: dict[str, mx.array] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []
        self.digests: dict[str, tuple[int, int, str]] = {}  # file name -> (size, mtime_ns, sha256), as written

    def add(self, floats: dict[str, mx.array], quantized: dict | None = None) -> None:
        tensors = cast_items(floats.items(), self.float_dtype)
        self.nbytes["other"] += sum(v.nbytes for v in tensors.values())
        for mod, q in (quantized or {}).items():
            tensors.update(self._quantized(mod, q))
        self.pending.update(tensors)
        self.pending_bytes += sum(v.nbytes for v in tensors.values())
        if self.pending_bytes >= self.shard_bytes:
            self._flush()

    def _quantized(self, mod: str, q: QuantizedWeight) -> dict[str, mx.array]:
        scales, biases, g = q.scales, q.biases, q.group_size
        if g == -1:  # per-channel: stored as 128/64/32-wide groups sharing one scale (loadable; bytes as stored)
            g = next(s for s in (128, 64, 32) if q.shape[1] % s == 0)
            reps = q.shape[1] // g
            scales, biases = mx.repeat(scales, reps, axis=1), mx.repeat(biases, reps, axis=1)
        wq = q.stored_shape(q.packed())
        if q.mode == "affine":
            scales, biases = (q.stored_shape(a.astype(self.float_dtype)) for a in (scales, biases))
        else:  # MLX's float modes keep their own scale dtype (uint8 exponents) and have no biases
            scales = q.stored_shape(scales)
        out = {f"{mod}.weight": wq, f"{mod}.scales": scales}
        if biases is not None:
            out[f"{mod}.biases"] = biases
        entry = {"group_size": g, "bits": q.bits} | ({} if q.mode == "affine" else {"mode": q.mode})
        self.nbytes["codes"] += wq.nbytes
        self.nbytes["scales_biases"] += scales.nbytes + (biases.nbytes if biases is not None else 0)
        self.n_quant_params += q.shape[0] * q.shape[1]
        self.any_quantized = True
        if entry["bits"] != self.qcfg["bits"] or entry["group_size"] != self.qcfg["group_size"]:
            self.qcfg[mod] = entry
        return out

    def _flush(self) -> None:
        if not self.pending:
            return
        name, keys = write_shard(self.out, len(self.shards), self.pending)
        self.shards.append((name, keys))
        self.pending, self.pending_bytes = {}, 0
        self.digests[name] = (*file_stamp(self.out / name), sha256_file(self.out / name))  # still in the page cache

    def close(self, config: dict, src: str | Path | None, keep_float: set[str] | None = None) -> dict:
        """Finish the folder -> bytes written per kind {codes, scales_biases, other, total}."""
        self._flush()
        names = rename_shards(self.out, self.shards)
        self.digests = {final: self.digests[tmp] for (tmp, _), final in zip(self.shards, names)}  # renames keep mtime
        self.nbytes["total"] = sum(self.nbytes[k] for k in ("codes", "scales_biases", "other"))
        cfg = {}
        if self.any_quantized:
            for mod in sorted(keep_float or ()):
                self.qcfg[mod] = False
            cfg = {"quantization": self.qcfg, "quantization_config": self.qcfg}
        write_config(self.out, config, cfg, self.float_dtype, src)
        return dict(self.nbytes, shards=len(names))


def write_shard(folder: Path, k: int, tensors: dict[str, mx.array], fmt: str = "mlx") -> tuple[str, list[str]]:
    """Write shard k under a temporary name (not matched by ``weight_files``; ``rename_shards`` names it) ->
    (file name, its tensor names)."""
    name = f".shard-{k:05d}.safetensors"
    mx.save_safetensors(str(Path(folder) / name), tensors, metadata={"format": fmt})
    return name, list(tensors)


def rename_shards(out: Path, shards: list[tuple[str, list[str]]]) -> list[str]:
    """Give written shards mlx-lm's names (and an index when there are several) -> the final file names."""
    if len(shards) == 1:
        os.replace(out / shards[0][0], out / "model.safetensors")
        return ["model.safetensors"]
    weight_map, names = {}, []
    for i, (tmp, keys) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(out / tmp, out / final)
        weight_map.update({k: final for k in keys})
        names.append(final)
    total = sum((out / n).stat().st_size for n in names)
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                              "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    return names


def save_compressed(floats: dict[str, mx.array], quantized: dict, config: dict, src: str | Path, out: str | Path, *,
                    default_bits: int | None, default_group_size: int, mode: str = "affine",
                    float_dtype=mx.float16, keep_float: set[str] | None = None,
                    shard_bytes: int = SHARD_BYTES) -> dict:
    """Write a whole compressed model at once with a ``FolderWriter`` (the pipeline streams into one instead) ->
    bytes written per kind. keep_float: module paths of layers mlx-lm could quantize but we keep in floating point
    (written as ``False`` overrides)."""
    w = FolderWriter(out, default_bits=default_bits, default_group_size=default_group_size, mode=mode,
                     float_dtype=float_dtype, shard_bytes=shard_bytes)
    w.add(floats, quantized)
    return w.close(config, src, keep_float)


def _files_holding(folder: Path, tensors: dict[str, mx.array]) -> list[Path]:
    """The weight files of ``folder`` that hold any of ``tensors`` (read from the files' headers, lazily)."""
    where = {k: f for f in weight_files(folder) for k in load_file(f)}
    unknown = sorted(set(tensors) - set(where))
    if unknown:
        raise ModelError(f"{folder} has no tensors {unknown[:3]}{' ...' if len(unknown) > 3 else ''}")
    return sorted({where[k] for k in tensors})


def save_replaced(src: str | Path, out: str | Path, tensors: dict[str, mx.array], *, overwrite: bool = False) -> Path:
    """Copy the model folder ``src`` to ``out`` (atomically, one weight file at a time) with some of its tensors
    replaced, each cast to the dtype it had (e.g. tuned scales/biases of a compressed model). Its evidence.json, if
    any, is not copied: it describes ``src``."""
    src = Path(src)
    touched = _files_holding(src, tensors)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for f in src.iterdir():
            if f.name == "evidence.json" or not f.is_file():
                continue
            if f in touched:
                _write_replaced(f, tmp / f.name, tensors)
            else:
                shutil.copy2(f, tmp / f.name)
    return Path(out)


def _write_replaced(f: Path, dest: Path, tensors: dict[str, mx.array]) -> None:
    weights = load_file(f)
    weights.update({k: v.astype(weights[k].dtype) for k, v in tensors.items() if k in weights})
    mx.save_safetensors(str(dest), weights, metadata={"format": "mlx"})


def replace_tensors(folder: str | Path, tensors: dict[str, mx.array]) -> None:
    """Rewrite ``folder``'s weights in place with some tensors replaced (dtype kept), one weight file at a time:
    each touched file is written under a temporary name, then renamed over the old one."""
    folder = Path(folder)
    for f in _files_holding(folder, tensors):
        part = folder / f".replacing-{f.name}"  # not matched by weight_files' model*.safetensors
        _write_replaced(f, part, tensors)
        os.replace(part, f)


def cast_items(items, float_dtype) -> dict[str, mx.array]:
    """(path, tensor) pairs -> {path: tensor}, floating tensors cast to ``float_dtype`` (others as they are)."""
    return {k: v.astype(float_dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in items}


def write_config(out: str | Path, config: dict, extra: dict, float_dtype, src: str | Path | None) -> None:
    """config.json (``config`` without its quantization blocks, plus ``extra`` and torch_dtype) and the tokenizer
    files of ``src``."""
    out = Path(out)
    cfg = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    cfg.update(extra)
    cfg["torch_dtype"] = {mx.float16: "float16", mx.bfloat16: "bfloat16", mx.float32: "float32"}[float_dtype]
    (out / "config.json").write_text(json.dumps(dict(sorted(cfg.items())), indent=2))
    for name in TOKENIZER_FILES if src is not None else ():
        f = Path(src) / name
        if f.is_file():  # a link out of the folder was refused when it was opened (open.refuse_outside_links)
            shutil.copyfile(f, out / name)


def write_folder(out: str | Path, tensors: dict[str, mx.array], config: dict, extra: dict, float_dtype,
                 src: str | Path | None) -> None:
    """The mlx-lm part of an output folder written at once: model.safetensors and ``write_config``'s files."""
    mx.save_safetensors(str(Path(out) / "model.safetensors"), tensors, metadata={"format": "mlx"})
    write_config(out, config, extra, float_dtype, src)
