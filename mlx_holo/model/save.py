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
import tempfile
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx

from .files import TOKENIZER_FILES, ModelError, load_weights, weight_files


def replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished temp folder into place; an existing folder is swapped out only after success."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False):
    """Yield a temp folder beside ``out``; on success it becomes ``out``, on any failure it is removed."""
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any other folder
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_compressed(floats: dict[str, mx.array], quantized: dict, config: dict, src: str | Path, out: str | Path, *,
                    default_bits: int | None, default_group_size: int, mode: str = "affine",
                    float_dtype=mx.float16, keep_float: set[str] | None = None) -> dict:
    """Write an mlx-lm folder into ``out`` (an existing, empty folder: see ``atomic_dir``).

    floats: parameter path -> float tensor (stored in ``float_dtype``); quantized: module path -> QuantizedWeight
    (affine or one of MLX's float modes). keep_float: module paths of layers
    mlx-lm could quantize but we keep in floating point (written as ``False`` overrides).
    Returns the bytes written per kind {codes, scales_biases, other, total}.
    """
    tensors = cast_items(floats.items(), float_dtype)
    nbytes = {"codes": 0, "scales_biases": 0, "other": sum(v.nbytes for v in tensors.values())}
    qcfg: dict = {"group_size": default_group_size, "bits": default_bits or 8, "mode": mode}
    for mod, q in quantized.items():
        scales, biases, g = q.scales, q.biases, q.group_size
        if g == -1:  # per-channel: stored as 128/64/32-wide groups sharing one scale (loadable; bytes as stored)
            g = next(s for s in (128, 64, 32) if q.shape[1] % s == 0)
            reps = q.shape[1] // g
            scales, biases = mx.repeat(scales, reps, axis=1), mx.repeat(biases, reps, axis=1)
        wq = q.stored_shape(q.packed())
        if q.mode == "affine":
            scales, biases = (q.stored_shape(a.astype(float_dtype)) for a in (scales, biases))
        else:  # MLX's float modes keep their own scale dtype (uint8 exponents) and have no biases
            scales = q.stored_shape(scales)
        tensors.update({f"{mod}.weight": wq, f"{mod}.scales": scales})
        if biases is not None:
            tensors[f"{mod}.biases"] = biases
        entry = {"group_size": g, "bits": q.bits} | ({} if q.mode == "affine" else {"mode": q.mode})
        nbytes["codes"] += wq.nbytes
        nbytes["scales_biases"] += scales.nbytes + (biases.nbytes if biases is not None else 0)
        if entry["bits"] != qcfg["bits"] or entry["group_size"] != qcfg["group_size"]:
            qcfg[mod] = entry
    nbytes["total"] = sum(nbytes.values())
    cfg = {}
    if quantized:
        for mod in sorted(keep_float or ()):
            qcfg[mod] = False
        cfg = {"quantization": qcfg, "quantization_config": qcfg}
    write_folder(out, tensors, config, cfg, float_dtype, src)
    return nbytes


def _with_replaced(folder: Path, tensors: dict[str, mx.array]) -> dict[str, mx.array]:
    """All tensors of ``folder`` (lazy) with ``tensors`` put in, each cast to the dtype it had."""
    weights = load_weights(folder)
    unknown = sorted(set(tensors) - set(weights))
    if unknown:
        raise ModelError(f"{folder} has no tensors {unknown[:3]}{' ...' if len(unknown) > 3 else ''}")
    weights.update({k: v.astype(weights[k].dtype) for k, v in tensors.items()})
    return weights


def save_replaced(src: str | Path, out: str | Path, tensors: dict[str, mx.array], *, overwrite: bool = False) -> Path:
    """Copy the model folder ``src`` to ``out`` (atomically) with some of its tensors replaced, each cast to the
    dtype it had (e.g. tuned scales/biases of a compressed model). Its evidence.json, if any, is not copied: it
    describes ``src``."""
    src = Path(src)
    weights = _with_replaced(src, tensors)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        for f in src.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name != "evidence.json":
                shutil.copy2(f, tmp / f.name)
    return Path(out)


def replace_tensors(folder: str | Path, tensors: dict[str, mx.array]) -> None:
    """Rewrite ``folder``'s weights in place with some tensors replaced (dtype kept): a new model.safetensors is
    written under a temporary name, then the old weight files go and it is renamed."""
    folder = Path(folder)
    weights = _with_replaced(folder, tensors)
    part = folder / ".replacing.safetensors"  # not matched by weight_files' model*.safetensors
    mx.save_safetensors(str(part), weights, metadata={"format": "mlx"})
    del weights
    for f in weight_files(folder):
        f.unlink()
    os.replace(part, folder / "model.safetensors")


def cast_items(items, float_dtype) -> dict[str, mx.array]:
    """(path, tensor) pairs -> {path: tensor}, floating tensors cast to ``float_dtype`` (others as they are)."""
    return {k: v.astype(float_dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in items}


def write_folder(out: str | Path, tensors: dict[str, mx.array], config: dict, extra: dict, float_dtype,
                  src: str | Path | None) -> None:
    """The mlx-lm part of an output folder: model.safetensors, config.json (``config`` without its quantization
    blocks, plus ``extra`` and torch_dtype) and the tokenizer files of ``src``."""
    out = Path(out)
    cfg = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    cfg.update(extra)
    cfg["torch_dtype"] = {mx.float16: "float16", mx.bfloat16: "bfloat16", mx.float32: "float32"}[float_dtype]
    mx.save_safetensors(str(out / "model.safetensors"), tensors, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(dict(sorted(cfg.items())), indent=2))
    for name in TOKENIZER_FILES if src is not None else ():
        if (Path(src) / name).exists():
            shutil.copy2(Path(src) / name, out / name)
