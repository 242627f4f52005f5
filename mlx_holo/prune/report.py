"""Proof of pruning: read a saved folder back and check the sparsity (and N:M pattern) each layer claims."""
from __future__ import annotations

import mlx.core as mx

from ..model.files import load_weights, read_config
from .masks import check_nm, parse_nm


def sparsity_report(folder, layers: list, nm: str | None) -> dict:
    """Read the saved tensors back and check the claimed sparsity / N:M pattern of the pruned (block) linears.

    Every pruned linear is read from the saved folder (quantized ones dequantized with the stored bits/group size
    as mlx-lm will), its exact zeros counted (``sparsity_saved`` per layer) and, with ``nm``, its N:M pattern
    checked. ``claims_hold`` is True when every layer keeps at least the zeros its mask claimed (``sparsity``);
    a quantizer that moves pruned weights off zero makes it False. Embeddings / lm_head (paths without a layer
    index) are never pruned and are left out; MoE experts are checked expert by expert.
    """
    weights = load_weights(folder)
    qcfg = read_config(folder).get("quantization") or {}
    total = zeros = 0
    claimed = 0.0
    nm_ok = claims_ok = True
    checked = quantized = 0
    for r in layers:
        name = r["name"]
        w = weights.get(f"{name}.weight")
        if w is None or w.ndim not in (2, 3) or not any(p.isdigit() for p in name.split(".")):
            continue
        if f"{name}.scales" in weights:
            q = qcfg.get(name) or qcfg
            w = mx.dequantize(w, weights[f"{name}.scales"], weights.get(f"{name}.biases"),
                              group_size=q["group_size"], bits=q["bits"], mode=q.get("mode", "affine"))
            quantized += 1
        w = w.reshape(-1, w.shape[-1])  # MoE experts [E, out, in]: each expert's rows
        z = int((w == 0).sum().item())
        r["sparsity_saved"] = z / w.size
        claims_ok &= z >= round(r["sparsity"] * w.size)
        claimed += r["sparsity"] * w.size
        total += w.size
        zeros += z
        checked += 1
        if nm:
            n_, m_ = parse_nm(nm)
            nm_ok &= bool(check_nm(w != 0, n_, m_))
    return {"overall": zeros / total if total else 0.0, "overall_claimed": claimed / total if total else 0.0,
            "checked": checked > 0, "claims_hold": bool(claims_ok and checked > 0), "layers_checked": checked,
            "layers_quantized": quantized, "nm": nm, "nm_pattern_holds": (nm_ok if nm and checked else None)}
