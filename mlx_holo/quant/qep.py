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


def qep_matrix(H: mx.array, D: mx.array, damp: float = 0.01) -> mx.array:
    """-> M = D (H + damp * mean(diag H) I)^-1 [in, in] float32, the correction W* = w + alpha * w M of every row
    (module docstring). Dead inputs (H_ii == 0: the compressed model never drives them) get no correction."""
    Hn = np.array(H, dtype=np.float64)
    Dn = np.array(D, dtype=np.float64)
    diag = np.diag(Hn).copy()
    dead = diag == 0
    Hn[dead, dead] = 1.0
    Hn += damp * float(np.mean(diag)) * np.eye(Hn.shape[0])
    M = np.linalg.solve(Hn, Dn.T).T  # D H^-1 [in, in] (H symmetric)
    M[:, dead] = 0.0
    return mx.array(M.astype(np.float32))


def qep_apply(w: mx.array, M: mx.array, alpha: float) -> mx.array:
    """w [out, in] (any rows of a layer) -> W* = w + alpha * w M [out, in] float32."""
    w32 = w.astype(mx.float32)
    return w32 + alpha * (w32 @ M)


def qep_correct(w: mx.array, H: mx.array, D: mx.array, alpha: float = 0.5, damp: float = 0.01) -> mx.array:
    """w [out, in] -> W* = w + alpha * w D (H + damp * mean(diag H) I)^-1 [out, in] float32 (module docstring)."""
    if alpha == 0.0:
        return w.astype(mx.float32)
    return qep_apply(w, qep_matrix(H, D, damp), alpha)
