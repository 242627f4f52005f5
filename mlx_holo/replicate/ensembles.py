"""Replicated-layer ensembles: K replicas of an MLP block over ONE shared low-bit code tensor.

The project's own idea (issue "Replicated-layer ensembles"). At batch-1 decode an LLM is memory-bound, so extra
arithmetic is almost free while extra bytes are not. A linear layer keeps one affine code tensor ``q`` (MLX's format,
``w ~= s * q + b`` per group, see ``quant.formats``) but K parameter sets ``(s_k, b_k)``; a whole SwiGLU block is run
once per replica and the outputs are mixed across the non-linearity:

    y = sum_k a_k * down_k(silu(gate_k(x)) * up_k(x)),   W_k = s_k * q + b_k  (per group)

so the ensemble is not just another affine dequantization (a mixture of *linear* replicas with shared codes would
collapse to one affine map with averaged parameters). Bytes read per token stay one copy of the codes plus K small
parameter sets. Related ideas: shared-code ensembles echo "BitStack"/multi-scale residual quantizers and the
ensembling of low-precision networks of Zhu, Al-Ars, Hofstee 2019 ("Binary Ensemble Neural Network"); the frozen-code
parameter tuning is that of PEQA (Kim et al. 2023, "Memory-Efficient Fine-Tuning of Compressed LLMs via sub-4-bit
Integer Quantization"), which tunes only the scales of a quantized model.

Initialisation (``init_replicas``): replica 0 carries the base quantizer's parameters (RTN/GPTQ), optionally
re-fitted by (importance-weighted) least squares to the float weight given the frozen codes (``fit_affine``: per
group, the closed-form regression of w on q). Re-fitting every replica by least squares would give every replica
the same unique optimum, so the others start from replica 0 perturbed symmetrically in clip ratio (scale x r_k,
about the group's centre) and grid offset (bias + o_k * s); ``tune.py`` then moves them apart on calibration data.

Also here: selective replication under a byte budget (``select_replication``), MoE expert replication that keeps
the router in full precision (``EnsembleSwitchGLU`` / ``replicate_moe``), and the byte accounting.
Adjacent-layer code sharing (one code tensor for several layers) is in ``share.py``, tuning in ``tune.py``, folders in
``io.py``. One file for the format: the replicated weight, its linear, the two ensemble modules and their
initialisation and byte accounting are one data layout and change together.
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..model.structure import set_module
from ..quant.formats import FormatError, QuantizedWeight, check_affine, pack
from ..quant.rtn import quantize_rtn

MIXING = ("mean", "softmax", "free")


# ------------------------------------------------------------------------------------------------ format

def dequantize_replicas(codes: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
    """codes [..., out, in], scales/biases [..., K, out, G] -> W [..., K, out, in] float32."""
    *lead, out, n = codes.shape
    n_groups = scales.shape[-1]
    g = n // n_groups
    q = codes.astype(mx.float32).reshape(*lead, 1, out, n_groups, g)             # [..., 1, out, G, g]
    w = q * scales.astype(mx.float32)[..., None] + biases.astype(mx.float32)[..., None]
    return w.reshape(*lead, scales.shape[-3], out, n)


@dataclass
class ReplicatedWeight:
    """One linear layer with K replicas: codes [out, in] uint8 (shared), scales/biases [K, out, in // g]."""

    codes: mx.array
    scales: mx.array
    biases: mx.array
    bits: int
    group_size: int

    @property
    def k(self) -> int:
        return int(self.scales.shape[0])

    def dequantize(self) -> mx.array:
        """-> [K, out, in] float32."""
        return dequantize_replicas(self.codes, self.scales, self.biases)

    def replica(self, k: int) -> QuantizedWeight:
        return QuantizedWeight(self.codes, self.scales[k], self.biases[k], self.bits, self.group_size)

    def packed(self) -> mx.array:
        return pack(self.codes, self.bits)

    def nbytes(self, scale_dtype=mx.float16) -> dict:
        """Stored bytes: the packed codes once and K (scales, biases) sets in ``scale_dtype``."""
        return {"codes": self.codes.size * self.bits // 8,
                "scales_biases": 2 * self.scales.size * scale_dtype.size}


# ------------------------------------------------------------------------------------------------ init

def fit_affine(w: mx.array, codes: mx.array, group_size: int, importance: mx.array | None = None,
               fallback_scale: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """Least-squares (s, b) per group for frozen codes: min sum_i u_i (w_i - s q_i - b)^2.

    w, codes: [out, in]; importance u: optional [in] (e.g. E[x^2]); fallback_scale [out, G] for groups whose codes
    are all equal (then only b is determined). -> scales, biases [out, G] float32 (closed form regression).
    """
    out, n = w.shape
    G = n // group_size
    wg = w.astype(mx.float32).reshape(out, G, group_size)
    qg = codes.astype(mx.float32).reshape(out, G, group_size)
    u = mx.ones((1, G, group_size)) if importance is None else \
        mx.maximum(importance.astype(mx.float32), 1e-12).reshape(1, G, group_size)
    su = u.sum(axis=2)                                                   # [1, G]
    mq, mw = (u * qg).sum(axis=2) / su, (u * wg).sum(axis=2) / su        # [out, G]
    dq, dw = qg - mq[..., None], wg - mw[..., None]
    var = (u * dq * dq).sum(axis=2)
    cov = (u * dq * dw).sum(axis=2)
    fb = mx.full(var.shape, 1e-8) if fallback_scale is None else fallback_scale.astype(mx.float32)
    s = mx.where(var > 0, cov / mx.maximum(var, 1e-12), fb)
    return s, mw - s * mq


def default_perturbations(k: int, clip_step: float = 0.05, offset_step: float = 0.15) -> list[tuple[float, float]]:
    """(clip ratio r, grid offset o) per replica: replica 0 = (1, 0), then symmetric pairs (1 + j c, +j o),
    (1 - j c, -j o), so the replicas' mean parameters equal replica 0's when K is odd."""
    out = [(1.0, 0.0)]
    j = 1
    while len(out) < k:
        out.append((1.0 + j * clip_step, j * offset_step))
        if len(out) < k:
            out.append((1.0 - j * clip_step, -j * offset_step))
        j += 1
    return out


def init_replicas(w: mx.array, k: int, bits: int, group_size: int, *, base: QuantizedWeight | None = None,
                  refit: bool = True, importance: mx.array | None = None, clip_search: bool = True,
                  perturbations: list[tuple[float, float]] | None = None,
                  scale_dtype=mx.float16) -> ReplicatedWeight:
    """w [out, in] -> ReplicatedWeight with K replicas over one code tensor.

    base: the quantizer whose codes are shared (default: RTN with clip search weighted by ``importance``).
    refit: replace replica 0's parameters by the least-squares fit for the frozen codes (``fit_affine``).
    perturbations: (clip ratio, grid offset in steps) per replica (default ``default_perturbations(k)``).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    check_affine(bits, group_size, w.shape[1])
    w = w.astype(mx.float32)
    if base is None:
        base = quantize_rtn(w, bits, group_size, clip_search=clip_search, importance=importance,
                            scale_dtype=scale_dtype)
    if base.group_size != group_size or base.bits != bits:
        raise FormatError(f"base is {base.bits}-bit g{base.group_size}, asked for {bits}-bit g{group_size}")
    s0, b0 = base.scales.astype(mx.float32), base.biases.astype(mx.float32)   # [out, G]
    if refit:
        s0, b0 = fit_affine(w, base.codes, group_size, importance, fallback_scale=s0)
    pert = perturbations or default_perturbations(k)
    if len(pert) < k:
        raise ValueError(f"need {k} perturbations, got {len(pert)}")
    centre = (2**bits - 1) / 2.0
    scales, biases = [], []
    for r, o in pert[:k]:
        s = s0 * r
        b = b0 + (1.0 - r) * s0 * centre + o * s0   # keep the group's centre, then shift the grid by o steps
        scales.append(s.astype(scale_dtype).astype(mx.float32))
        biases.append(b.astype(scale_dtype).astype(mx.float32))
    return ReplicatedWeight(base.codes, mx.stack(scales), mx.stack(biases), bits, group_size)


# ------------------------------------------------------------------------------------------------ modules

class ReplicatedLinear(nn.Module):
    """Frozen codes [..., out, in] (uint8) + trainable scales/biases [..., K, out, G]; no bias vector."""

    def __init__(self, codes: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int):
        super().__init__()
        self.codes = codes.astype(mx.uint8)
        self.scales = scales.astype(mx.float32)
        self.biases = biases.astype(mx.float32)
        self.bits, self.group_size = bits, group_size
        self.freeze(keys=["codes"], recurse=False)

    @classmethod
    def from_weight(cls, rw: ReplicatedWeight) -> "ReplicatedLinear":
        return cls(rw.codes, rw.scales, rw.biases, rw.bits, rw.group_size)

    def to_weight(self) -> ReplicatedWeight:
        return ReplicatedWeight(self.codes, self.scales, self.biases, self.bits, self.group_size)

    @property
    def k(self) -> int:
        return int(self.scales.shape[-3])

    def weights(self) -> mx.array:
        """-> [..., K, out, in] float32 (the dequantized float replicas)."""
        return dequantize_replicas(self.codes, self.scales, self.biases)


def _mix_weights(mix: mx.array, mixing: str) -> mx.array:
    if mixing == "mean":
        return mx.full(mix.shape, 1.0 / mix.shape[-1])
    if mixing == "softmax":
        return mx.softmax(mix, axis=-1)
    return mix


def _init_mix(k: int, mixing: str, lead: tuple = ()) -> mx.array:
    if mixing not in MIXING:
        raise ValueError(f"mixing must be one of {MIXING}, got {mixing!r}")
    return mx.full((*lead, k), 1.0 / k) if mixing == "free" else mx.zeros((*lead, k))


class _Mixed(nn.Module):
    """Shared by the dense and MoE ensembles: replica count and the normalised mixing weights."""

    @property
    def k(self) -> int:
        return self.gate_proj.k

    def mix_weights(self) -> mx.array:
        return _mix_weights(self.mix, self.mixing)


class EnsembleMLP(_Mixed):
    """SwiGLU MLP with K replicas over shared codes: y = sum_k a_k down_k(silu(gate_k x) * up_k x).

    mixing: 'mean' (a_k = 1/K, fixed), 'softmax' (a = softmax(mix), learned) or 'free' (a = mix, learned).
    backend: 'dense' dequantizes float replicas and uses matmuls (CPU scoring and tuning); 'kernel' calls
    ``mlx_holo.kernels.replica_matvec`` on packed codes (codes read once for all K; the down projection is fed the
    K hidden states stacked as rows and keeps the diagonal blocks, i.e. K^2 cheap dot products per code read).
    """

    def __init__(self, gate: ReplicatedWeight, up: ReplicatedWeight, down: ReplicatedWeight, mixing: str = "mean",
                 mix: mx.array | None = None, backend: str = "dense"):
        super().__init__()
        if not gate.k == up.k == down.k:
            raise ValueError(f"replica counts differ: gate {gate.k}, up {up.k}, down {down.k}")
        self.gate_proj = ReplicatedLinear.from_weight(gate)
        self.up_proj = ReplicatedLinear.from_weight(up)
        self.down_proj = ReplicatedLinear.from_weight(down)
        self.mix = _init_mix(gate.k, mixing) if mix is None else mix.astype(mx.float32)
        self.mixing, self.backend = mixing, backend
        if mixing == "mean":
            self.freeze(keys=["mix"], recurse=False)

    def replica_outputs(self, x: mx.array) -> mx.array:
        """x [..., D] -> per-replica outputs [K, M, D] with M = prod(leading dims)."""
        xf = x.reshape(-1, x.shape[-1])                                                   # [M, D]
        if self.backend == "kernel":
            return self._kernel_outputs(xf)
        wg, wu, wd = self.gate_proj.weights(), self.up_proj.weights(), self.down_proj.weights()  # [K, H, D] ...
        h = nn.silu(xf @ wg.transpose(0, 2, 1)) * (xf @ wu.transpose(0, 2, 1))              # [K, M, H]
        return h @ wd.transpose(0, 2, 1)                                                  # [K, M, D]

    def _kernel_outputs(self, xf: mx.array) -> mx.array:
        from mlx_holo.kernels import replica_matvec

        k, m = self.k, xf.shape[0]

        cache = self.__dict__.setdefault("_packed", {})  # plain attribute: not a parameter

        def run(lin, inp):
            key = id(lin.codes)
            if key not in cache:  # pack once per code tensor (codes are frozen)
                cache[key] = pack_codes(lin.codes, lin.bits)
            return replica_matvec(inp, cache[key], lin.scales, lin.biases, lin.bits, lin.group_size)

        h = nn.silu(run(self.gate_proj, xf)) * run(self.up_proj, xf)                        # [K, M, H]
        y = run(self.down_proj, h.reshape(k * m, -1)).reshape(k, k, m, -1)                 # [K, K, M, D]
        idx = mx.arange(k)
        return y[idx, idx]                                                                 # [K, M, D]

    def __call__(self, x: mx.array) -> mx.array:
        y = self.replica_outputs(x)                                                        # [K, M, D]
        a = self.mix_weights().astype(y.dtype)
        return (a[:, None, None] * y).sum(axis=0).reshape(*x.shape[:-1], -1).astype(x.dtype)

    def weights(self) -> dict[str, ReplicatedWeight]:
        return {n: getattr(self, n).to_weight() for n in ("gate_proj", "up_proj", "down_proj")}


def pack_codes(codes: mx.array, bits: int) -> mx.array:
    """codes [..., out, in] -> packed uint32 [..., out, in * bits // 32] (``formats.pack`` row by row)."""
    *lead, out, n = codes.shape
    return pack(codes.reshape(-1, n), bits).reshape(*lead, out, n * bits // 32)


class EnsembleSwitchGLU(_Mixed):
    """Drop-in for mlx_lm's ``SwitchGLU`` with every expert replicated K times over its own shared codes.

    codes [E, out, in], scales/biases [E, K, out, G]; mixing weights per expert [E, K]. Called like SwitchGLU:
    (x [..., D], indices [..., top_k]) -> [..., top_k, D]. The router lives outside (the MoE block's ``gate``) and is
    never touched.
    """

    def __init__(self, gate: ReplicatedLinear, up: ReplicatedLinear, down: ReplicatedLinear, mixing: str = "mean",
                 mix: mx.array | None = None):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down
        e, k = gate.scales.shape[0], gate.k
        self.mix = _init_mix(k, mixing, (e,)) if mix is None else mix.astype(mx.float32)
        self.mixing = mixing
        if mixing == "mean":
            self.freeze(keys=["mix"], recurse=False)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        x = mx.expand_dims(x, (-2, -3))                                                    # [..., 1, 1, D]
        indices = mx.stop_gradient(indices)
        wg, wu, wd = self.gate_proj.weights(), self.up_proj.weights(), self.down_proj.weights()  # [E, K, o, i]
        a = self.mix_weights()[indices]                                                    # [..., top_k, K]
        y = None
        for k in range(self.k):
            g = mx.gather_mm(x, wg[:, k].swapaxes(-1, -2), rhs_indices=indices)             # [..., top_k, 1, H]
            u = mx.gather_mm(x, wu[:, k].swapaxes(-1, -2), rhs_indices=indices)
            yk = mx.gather_mm(nn.silu(g) * u, wd[:, k].swapaxes(-1, -2), rhs_indices=indices)  # [..., top_k, 1, D]
            yk = a[..., k][..., None, None] * yk
            y = yk if y is None else y + yk
        return y.squeeze(-2)


# ------------------------------------------------------------------------------------------------ model surgery

def _is_mlp(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))


def find_mlps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every SwiGLU MLP (gate_proj/up_proj/down_proj Linears), in model order."""
    return [(p, m) for p, m in model.named_modules() if _is_mlp(m)][::-1]


def find_switch_glus(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from mlx_lm.models.switch_layers import SwitchGLU

    return [(p, m) for p, m in model.named_modules() if isinstance(m, SwitchGLU)][::-1]


def ensemble_from_mlp(mlp: nn.Module, k: int, bits: int, group_size: int, *, importance: dict | None = None,
                      mixing: str = "mean", refit: bool = True, clip_search: bool = True,
                      bases: dict[str, QuantizedWeight] | None = None,
                      perturbations: list[tuple[float, float]] | None = None) -> EnsembleMLP:
    """Float SwiGLU MLP -> EnsembleMLP. importance: {'gate_proj'|'up_proj'|'down_proj': [in]} (E[x^2]);
    bases: optional pre-computed QuantizedWeight per projection (e.g. GPTQ) whose codes are shared."""
    reps = {}
    for name in ("gate_proj", "up_proj", "down_proj"):
        lin = getattr(mlp, name)
        if "bias" in lin:
            raise ValueError("MLPs with bias vectors are not supported")
        reps[name] = init_replicas(lin.weight, k, bits, group_size, base=(bases or {}).get(name), refit=refit,
                                   importance=(importance or {}).get(name), clip_search=clip_search,
                                   perturbations=perturbations)
    return EnsembleMLP(reps["gate_proj"], reps["up_proj"], reps["down_proj"], mixing=mixing)


def replicate_mlps(model: nn.Module, k: int | dict[str, int], bits: int, group_size: int, *,
                   importance: dict | None = None, mixing: str = "mean", refit: bool = True,
                   clip_search: bool = True, on_progress=None) -> dict[str, int]:
    """Swap every SwiGLU MLP of ``model`` for an EnsembleMLP in place. k: one K for all, or {mlp path: K}
    (paths missing from the dict are left in float). importance: {mlp path: {proj: [in]}}. -> {path: K}."""
    mlps = find_mlps(model)
    done = {}
    for i, (path, mlp) in enumerate(mlps):
        kk = k.get(path) if isinstance(k, dict) else k
        if kk:
            ens = ensemble_from_mlp(mlp, kk, bits, group_size, importance=(importance or {}).get(path),
                                    mixing=mixing, refit=refit, clip_search=clip_search)
            mx.eval(ens.parameters())
            set_module(model, path, ens)
            done[path] = kk
        if on_progress:
            on_progress("replicate", i + 1, len(mlps))
    return done


def _replicate_expert_linear(w: mx.array, k: int, bits: int, group_size: int, refit: bool,
                             clip_search: bool) -> ReplicatedLinear:
    """w [E, out, in] -> ReplicatedLinear codes [E, out, in], scales [E, K, out, G] (groups never cross rows)."""
    e, out, n = w.shape
    rw = init_replicas(w.reshape(e * out, n), k, bits, group_size, refit=refit, clip_search=clip_search)
    G = n // group_size
    s = rw.scales.reshape(k, e, out, G).transpose(1, 0, 2, 3)
    b = rw.biases.reshape(k, e, out, G).transpose(1, 0, 2, 3)
    return ReplicatedLinear(rw.codes.reshape(e, out, n), s, b, bits, group_size)


def replicate_moe(model: nn.Module, k: int, bits: int, group_size: int, *, mixing: str = "mean", refit: bool = True,
                  clip_search: bool = True) -> list[str]:
    """Replace every SwitchGLU (the experts of an MoE layer) by an EnsembleSwitchGLU with K replicas per expert.
    Routers (``gate`` Linears of the MoE blocks) and everything else stay as they are. -> replaced paths."""
    done = []
    for path, sw in find_switch_glus(model):
        if any("bias" in getattr(sw, n) for n in ("gate_proj", "up_proj", "down_proj")):
            raise ValueError(f"{path}: expert bias vectors are not supported")
        lins = [_replicate_expert_linear(getattr(sw, n).weight, k, bits, group_size, refit, clip_search)
                for n in ("gate_proj", "up_proj", "down_proj")]
        ens = EnsembleSwitchGLU(*lins, mixing=mixing)
        mx.eval(ens.parameters())
        set_module(model, path, ens)
        done.append(path)
    return done


# ------------------------------------------------------------------------------------------------ selection, bytes

def mlp_output_error(mlp_float: nn.Module, mlp_q: nn.Module, x: mx.array) -> float:
    """Relative squared output error ||f_q(x) - f(x)||^2 / ||f(x)||^2 on calibration inputs x [n, D]."""
    y = mlp_float(x).astype(mx.float32)
    d = mlp_q(x).astype(mx.float32) - y
    return float(((d * d).sum() / mx.maximum((y * y).sum(), 1e-20)).item())


def select_replication(sensitivity: dict[str, float], extra_bytes: dict[str, int], budget_bytes: int,
                       k_max: int = 3) -> dict[str, int]:
    """Greedy allocation of extra replicas under a byte budget -> {block: K}.

    sensitivity: block -> output error at K=1 (e.g. ``mlp_output_error``); extra_bytes: block -> bytes of one more
    parameter set. Each step gives one replica to the block with the largest sensitivity / (K * extra bytes)
    (diminishing returns in K) that still fits; stops when nothing fits.
    """
    ks = {b: 1 for b in sensitivity}
    left = int(budget_bytes)
    while True:
        cands = [(sensitivity[b] / (ks[b] * max(extra_bytes[b], 1)), b) for b in ks
                 if ks[b] < k_max and extra_bytes[b] <= left]
        if not cands:
            return ks
        _, best = max(cands)
        ks[best] += 1
        left -= extra_bytes[best]


def ensemble_nbytes(module: nn.Module, scale_dtype=mx.float16, mix_dtype=mx.float32) -> dict:
    """Bytes of an EnsembleMLP / EnsembleSwitchGLU as stored: packed codes once, K (scales, biases) in
    ``scale_dtype``, mixing weights in ``mix_dtype``. -> {codes, scales_biases, mix, total}."""
    codes = params = 0
    for name in ("gate_proj", "up_proj", "down_proj"):
        lin = getattr(module, name)
        codes += lin.codes.size * lin.bits // 8
        params += 2 * lin.scales.size * scale_dtype.size
    mix = module.mix.size * mix_dtype.size
    return {"codes": codes, "scales_biases": params, "mix": mix, "total": codes + params + mix}
