"""Replicated-ensemble folders: save and load.

Layout (an mlx-lm folder plus one file): ``model.safetensors`` holds every tensor outside the ensembles (floats in
``float_dtype``); ``ensemble.safetensors`` holds, per ensemble module path P and projection J in gate/up/down_proj,
``P.J.weight`` (codes packed with ``formats.pack``, uint32 [(E,) out, in * bits / 32]), ``P.J.scales`` and
``P.J.biases`` (float16 [(E,) K, out, in / g]) and ``P.mix`` (float32 mixing weights [(E,) K]); ``config.json`` gains
an ``ensemble`` block naming each module with its type, K, bits, group size and mixing. Stock ``mlx_lm.load``
refuses the folder (the MLP weights are missing from model.safetensors); ``load_ensemble`` builds the model and
swaps the ensemble modules in.
"""
from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..model.save import cast_items, write_folder
from ..model.structure import set_module
from ..quant.formats import unpack
from .ensembles import EnsembleMLP, EnsembleSwitchGLU, ReplicatedLinear, ReplicatedWeight, pack_codes


ENSEMBLE_FILE = "ensemble.safetensors"
ENSEMBLE_FORMAT_VERSION = 1
_PROJ = ("gate_proj", "up_proj", "down_proj")


def ensemble_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, (EnsembleMLP, EnsembleSwitchGLU))][::-1]


def save_ensemble(model: nn.Module, config: dict, out: str | Path, *, src: str | Path | None = None,
                  float_dtype=mx.float16, scale_dtype=mx.float16) -> dict:
    """Write ``model`` (with ensemble modules) into the existing folder ``out`` -> bytes written per kind
    {codes, scales_biases (incl. mixing), other, total}. src: folder to copy tokenizer files from."""
    out = Path(out)
    ens = ensemble_modules(model)
    prefixes = tuple(p + "." for p, _ in ens)
    floats = cast_items(((k, v) for k, v in tree_flatten(model.parameters()) if not k.startswith(prefixes)),
                          float_dtype)
    etensors, entries = {}, {}
    nbytes = {"codes": 0, "scales_biases": 0, "other": sum(v.nbytes for v in floats.values())}
    for path, m in ens:
        for j in _PROJ:
            lin = getattr(m, j)
            etensors[f"{path}.{j}.weight"] = pack_codes(lin.codes, lin.bits)
            etensors[f"{path}.{j}.scales"] = lin.scales.astype(scale_dtype)
            etensors[f"{path}.{j}.biases"] = lin.biases.astype(scale_dtype)
            nbytes["codes"] += etensors[f"{path}.{j}.weight"].nbytes
            nbytes["scales_biases"] += etensors[f"{path}.{j}.scales"].nbytes + etensors[f"{path}.{j}.biases"].nbytes
        etensors[f"{path}.mix"] = m.mix.astype(mx.float32)
        nbytes["scales_biases"] += etensors[f"{path}.mix"].nbytes
        lin = m.gate_proj
        entries[path] = {"type": "mlp" if isinstance(m, EnsembleMLP) else "switch_glu", "k": m.k, "bits": lin.bits,
                         "group_size": lin.group_size, "mixing": m.mixing,
                         "in_features": {j: int(getattr(m, j).codes.shape[-1]) for j in _PROJ}}
    nbytes["total"] = sum(nbytes.values())
    ens_cfg = {"format_version": ENSEMBLE_FORMAT_VERSION, "file": ENSEMBLE_FILE,
               "scale_dtype": str(scale_dtype).split(".")[-1], "modules": entries}
    mx.save_safetensors(str(out / ENSEMBLE_FILE), etensors, metadata={"format": "mlx-holo-ensemble"})
    write_folder(out, floats, config, {"ensemble": ens_cfg}, float_dtype, src)
    return nbytes


def _unpack_ensemble_codes(packed: mx.array, bits: int, n_in: int) -> mx.array:
    *lead, out, words = packed.shape
    return unpack(packed.reshape(-1, words), bits, n_in).reshape(*lead, out, n_in)


def load_ensemble(folder: str | Path, *, dtype=mx.float32, backend: str = "dense") -> nn.Module:
    """Open a folder written by ``save_ensemble`` -> model with EnsembleMLP / EnsembleSwitchGLU modules swapped in.
    Float tensors are cast to ``dtype``; ensemble scales/biases are held in float32 (their fp16 values)."""
    from mlx_lm.utils import load_model

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    block = cfg.get("ensemble")
    if not block:
        raise ValueError(f"{folder}/config.json has no 'ensemble' block: not a replicated-ensemble model")
    if block.get("format_version") != ENSEMBLE_FORMAT_VERSION:
        raise ValueError(f"unsupported ensemble format_version {block.get('format_version')!r}")
    model, _ = load_model(folder, lazy=True, strict=False)  # ensemble MLPs are absent from model.safetensors
    t = mx.load(str(folder / block.get("file", ENSEMBLE_FILE)))
    for path, e in block["modules"].items():
        lins = []
        for j in _PROJ:
            codes = _unpack_ensemble_codes(t[f"{path}.{j}.weight"], e["bits"], e["in_features"][j])
            lins.append(ReplicatedLinear(codes, t[f"{path}.{j}.scales"], t[f"{path}.{j}.biases"], e["bits"],
                                         e["group_size"]))
        if e["type"] == "mlp":
            rws = [ReplicatedWeight(lin.codes, lin.scales, lin.biases, lin.bits, lin.group_size) for lin in lins]
            mod = EnsembleMLP(*rws, mixing=e["mixing"], mix=t[f"{path}.mix"], backend=backend)
        elif e["type"] == "switch_glu":
            mod = EnsembleSwitchGLU(*lins, mixing=e["mixing"], mix=t[f"{path}.mix"])
        else:
            raise ValueError(f"unknown ensemble module type {e['type']!r} at {path}")
        set_module(model, path, mod)
    model.update(nn.utils.tree_map(lambda a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a,
                                   model.parameters()))
    missing = [k for k, v in tree_flatten(model.parameters()) if v.size == 0]
    if missing:
        raise ValueError(f"{folder}: empty tensors after load: {missing[:5]}")
    mx.eval(model.parameters())
    model.eval()
    return model
