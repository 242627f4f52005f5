"""Mixture-of-experts layers in the block-by-block pipeline: which modules are experts and routers, the tokens each
expert is routed, and per-expert compression.

mlx-lm holds a block's experts as ``SwitchLinear`` modules (``switch_mlp.{gate,up,down}_proj``, weight
[E, out, in]) beside a router ``nn.Linear`` (``gate``; qwen2-moe also has a one-row ``shared_expert_gate``).
Quantization and pruning work per expert: expert e's calibration input is what the router sends it (GPTQ's
Hessian H_e = X_e^T X_e / n_e, the convention of GPTQ/AutoGPTQ on Mixtral), an expert no calibration token reached
falls back to the data-free rule (RTN, magnitude). Routers stay float: they are tiny, and a rounding error there
changes *which* experts run, not just how well (mlx-lm keeps them at 8 bits for the same reason).

The E experts' codes are held as one ``QuantizedWeight`` of [E * out, in] rows with ``experts = E``
(``quant.formats.stack_experts``); ``model.save.save_compressed`` writes it as the [E, out, in * bits / 32] /
[E, out, in / g] tensors of mlx-lm's ``QuantizedSwitchLinear``.
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np



def is_switch(m: nn.Module) -> bool:
    """An mlx-lm ``SwitchLinear`` (by duck type: a [E, out, in] weight called with expert indices)."""
    return type(m).__name__ == "SwitchLinear" and "weight" in m and m.weight.ndim == 3


def expert_modules(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """[(path, SwitchLinear)] of a block, in call order of a SwitchGLU (up, gate, down) where named so."""
    found = [(p, m) for p, m in block.named_modules() if is_switch(m)]
    order = {"up_proj": 0, "gate_proj": 1, "fc1": 0, "down_proj": 2, "fc2": 2}
    return sorted(found, key=lambda pm: (pm[0].rsplit(".", 1)[0], order.get(pm[0].rsplit(".", 1)[-1], 1)))


def moe_container(expert_path: str) -> str | None:
    """An expert layer's path -> the path of the module holding its switch MLP ("mlp.switch_mlp.up_proj" -> "mlp",
    mixtral's "block_sparse_moe"), or None for a switch MLP that is not nested that way."""
    parts = expert_path.split(".")
    return ".".join(parts[:-2]) if len(parts) >= 3 else None


def router_paths(block: nn.Module) -> set[str]:
    """Paths of the routers of a block's experts: the ``nn.Linear`` modules inside the module that holds the switch
    MLP, outside the switch MLP itself, with at most E outputs (the router ``gate``, granite-moe's ``router.layer``,
    qwen2-moe's one-row ``shared_expert_gate``): kept float. A shared expert's MLP (wide outputs) is ordinary."""
    out = set()
    for p, m in expert_modules(block):
        moe = moe_container(p)
        if moe is None:
            continue
        switch, n_experts = p.rsplit(".", 1)[0], m.weight.shape[0]  # e.g. "mlp.switch_mlp"
        for q, lin in block.named_modules():
            if isinstance(lin, nn.Linear) and q.startswith(moe + ".") and not q.startswith(switch + ".") \
                    and lin.weight.shape[0] <= n_experts:
                out.add(q)
    return out


def routed_rows(inp: mx.array, indices: mx.array) -> tuple[mx.array, mx.array]:
    """A SwitchLinear call's input and indices -> (x [n, in], expert [n]): one row per (token, chosen expert).

    inp is [..., 1, in] broadcast against indices [...] (unsorted: [B, L, 1, 1, in] with [B, L, k]; sorted:
    [T * k, 1, in] with [T * k])."""
    x = mx.broadcast_to(inp, tuple(indices.shape) + tuple(inp.shape[-2:]))
    return x.reshape(-1, inp.shape[-1]), indices.reshape(-1)


def split_by_expert(x: mx.array | None, idx: mx.array | None, n_experts: int) -> list[mx.array | None]:
    """x [n, in], idx [n] -> per expert its rows [n_e, in] (None where no row was routed to it, or no x), in an
    order set by the rows' values (their first ``KEY_COLUMNS`` entries' bits), not by where they came from: MoE
    layers sort their tokens by expert in a batch-dependent order, and the Hessian's float sums over the rows must
    not depend on how the windows were batched (one process or several ranks)."""
    if x is None:
        return [None] * n_experts
    idx_np = np.array(idx)
    out = []
    for e in range(n_experts):
        rows = np.nonzero(idx_np == e)[0]
        if rows.size:
            xe = x[mx.array(rows)]
            keys = np.array(xe[:, :KEY_COLUMNS].astype(mx.float32)).view(np.uint32)  # [n_e, k] exact bits
            xe = xe[mx.array(np.lexsort(keys.T[::-1]))]
        out.append(xe if rows.size else None)
    return out


KEY_COLUMNS = 8  # columns whose bits order an expert's rows (rows that agree in all of them are alike enough)
