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

SOLVE_ROWS = 1024  # rows of QEP's M solved at a time


def propagation_stats(x_float: mx.array, x_quant: mx.array) -> tuple[mx.array, mx.array]:
    """x_float, x_quant [n, in] (the same tokens through the float / the compressed model) ->
    (H [in, in] = mean x_q x_q^T, D [in, in] = mean (x - x_q) x_q^T), float32."""
    assert x_float.shape == x_quant.shape, (x_float.shape, x_quant.shape)
    xq = x_quant.astype(mx.float32)
    return _stat(xq, xq), _stat(x_float.astype(mx.float32) - xq, xq)


def qep_matrix(x_float: mx.array, x_quant: mx.array, damp: float = 0.01) -> mx.array:
    """x_float, x_quant [n, in] -> M = D (H + damp * mean(diag H) I)^-1 [in, in] float32, the correction
    W* = w + alpha * w M of every row (module docstring; H, D as ``propagation_stats``). Dead inputs (H_ii == 0: the
    compressed model never drives them) get no correction.

    Memory: H is factorised in place in float64 (Cholesky; LU where it is not numerically positive definite) and M
    solved ``SOLVE_ROWS`` rows of D at a time into a float32 result: about 12 bytes per entry of [in, in] at the
    peak -- 2.5 GB for a 14336-wide input (an 8B model's down_proj), not the 12 GB of a general solve over copies."""
    from scipy.linalg import LinAlgError, cho_factor, cho_solve, lu_factor, lu_solve

    def damp_h(Hn: np.ndarray) -> np.ndarray:  # in place
        Hn[dead, dead] = 1.0
        Hn.flat[:: d + 1] += damp * float(np.mean(diag))
        return Hn

    Hn = _f64(_stat(x_quant, x_quant))  # [in, in] float64
    mx.clear_cache()  # MLX's float32 H is not kept for reuse beside it
    d = Hn.shape[0]
    diag = np.diag(Hn).copy()
    dead = diag == 0
    damp_h(Hn)
    try:  # H is symmetric, so Hn.T is Hn in Fortran order: factorised in place
        c = cho_factor(Hn.T, lower=False, overwrite_a=True, check_finite=False)

        def solve(b):
            return cho_solve(c, b, overwrite_b=True, check_finite=False)
    except LinAlgError:
        del Hn
        Hn = damp_h(_f64(_stat(x_quant, x_quant)))
        lu = lu_factor(Hn.T, overwrite_a=True, check_finite=False)  # factors H^T = H

        def solve(b):
            return lu_solve(lu, b, overwrite_b=True, check_finite=False)
    xq = x_quant.astype(mx.float32)
    diff = x_float.astype(mx.float32) - xq  # [n, in]
    mx.eval(diff)
    M = np.empty((d, d), np.float32)
    for j0 in range(0, d, SOLVE_ROWS):
        j1 = min(d, j0 + SOLVE_ROWS)
        Dj = _f64((diff[:, j0:j1].T @ xq) / xq.shape[0])  # rows j0:j1 of D [b, in]
        M[j0:j1] = solve(Dj.T).T  # rows of D H^-1 (H symmetric), solved in Dj's memory
    del Hn, solve, diff
    M[:, dead] = 0.0
    return mx.array(M)


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
