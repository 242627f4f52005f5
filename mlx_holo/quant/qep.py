"""QEP: quantization error propagation, a weight correction before a layer-wise quantizer.

Arai & Ichikawa 2025, "Quantization Error Propagation: Revisiting Layer-Wise Post-Training Quantization"
(arXiv:2504.09629). GPTQ calibrates each linear on the inputs that the already-compressed earlier layers produce
(X_q) and minimises ||(W - Q) X_q^T||^2: it keeps the layer faithful to its own weight, not to the float model, so
the errors of earlier layers pass through unchecked. QEP asks instead for ||W X^T - Q X_q^T||^2, with X the float
model's inputs. Writing D = mean (x - x_q) x_q^T over calibration tokens and H = mean x_q x_q^T, that objective is

    ||W X^T - Q X_q^T||^2 = n * trace((W* - Q) H (W* - Q)^T) + const,   W* = W + W D H^-1,

so the same quantizer, given W* and H, solves it. W D H^-1 is a regression fitted to the calibration tokens; the
paper shrinks it by ``alpha`` (0 = plain GPTQ, 1 = the full correction) and damps H, both against over-fitting a
small calibration set. The project's default is alpha 0.5 with damping 1.0 x mean(diag H), chosen by measurement
(docs/experiments.md, "QEP").
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np


def propagation_stats(x_float: mx.array, x_quant: mx.array) -> tuple[mx.array, mx.array]:
    """x_float, x_quant [n, in] (the same tokens through the float / the compressed model) ->
    (H [in, in] = mean x_q x_q^T, D [in, in] = mean (x - x_q) x_q^T), float32."""
    assert x_float.shape == x_quant.shape, (x_float.shape, x_quant.shape)
    xq = x_quant.astype(mx.float32)
    n = xq.shape[0]
    H = (xq.T @ xq) / n
    D = ((x_float.astype(mx.float32) - xq).T @ xq) / n
    return H, D


def qep_matrix(x_float: mx.array, x_quant: mx.array, damp: float = 0.01) -> mx.array:
    """x_float, x_quant [n, in] -> M = D (H + damp * mean(diag H) I)^-1 [in, in] float32, the correction
    W* = w + alpha * w M of every row (module docstring; H, D as ``propagation_stats``). Dead inputs (H_ii == 0: the
    compressed model never drives them) get no correction.

    Memory: H and D are formed one at a time and solved in place (Cholesky; LU where H is not numerically positive
    definite), about 20 bytes per entry of [in, in] at the peak -- a 14336-wide input (an 8B model's down_proj) needs
    4 GB, not the 12 GB of a general solve over copies."""
    from scipy.linalg import LinAlgError, cho_factor, cho_solve

    Hn = _f64(_stat(x_quant, x_quant))  # [in, in] float64
    d = Hn.shape[0]
    diag = np.diag(Hn).copy()
    dead = diag == 0
    Hn[dead, dead] = 1.0
    Hn.flat[:: d + 1] += damp * float(np.mean(diag))
    Dn = _f64(_stat(x_float - x_quant.astype(mx.float32), x_quant))  # [in, in] float64; Dn.T is Fortran-ordered
    try:  # H is symmetric, so Hn.T is Hn in Fortran order: factorised in place
        c = cho_factor(Hn.T, lower=False, overwrite_a=True, check_finite=False)
        Mt = cho_solve(c, Dn.T, overwrite_b=True, check_finite=False)  # H^-1 D^T, in Dn's memory
    except LinAlgError:
        del Hn
        Hn = _f64(_stat(x_quant, x_quant))
        Hn[dead, dead] = 1.0
        Hn.flat[:: d + 1] += damp * float(np.mean(diag))
        Mt = np.linalg.solve(Hn, Dn.T)
    del Hn
    M = Mt.T  # D H^-1 [in, in]
    M[:, dead] = 0.0
    M32 = M.astype(np.float32)
    del M, Mt, Dn
    return mx.array(M32)


def _stat(a: mx.array, b: mx.array) -> mx.array:
    """a, b [n, in] -> a^T b / n [in, in] float32."""
    b32 = b.astype(mx.float32)
    return (a.astype(mx.float32).T @ b32) / b32.shape[0]


def _f64(x: mx.array) -> np.ndarray:
    """An evaluated float32 MLX array -> a float64 NumPy copy (no float32 NumPy copy in between)."""
    mx.eval(x)
    out = np.empty(x.shape, np.float64)
    out[...] = np.asarray(x)  # a view of x's buffer, cast while copying
    return out


def qep_apply(w: mx.array, M: mx.array, alpha: float) -> mx.array:
    """w [out, in] (any rows of a layer) -> W* = w + alpha * w M [out, in] float32."""
    w32 = w.astype(mx.float32)
    return w32 + alpha * (w32 @ M)


def qep_correct(w: mx.array, x_float: mx.array, x_quant: mx.array, alpha: float = 0.5, damp: float = 0.01
                ) -> mx.array:
    """w [out, in], the same tokens' inputs x_float / x_quant [n, in] -> W* = w + alpha * w D (H + damp *
    mean(diag H) I)^-1 [out, in] float32 (module docstring)."""
    if alpha == 0.0:
        return w.astype(mx.float32)
    return qep_apply(w, qep_matrix(x_float, x_quant, damp), alpha)
