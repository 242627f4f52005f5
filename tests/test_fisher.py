"""Diagonal Fisher: per-window squared gradients of the LM loss, averaged; the model is left trainable."""
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_holo import model as models
from mlx_holo.allocate.fisher import diagonal_fisher, window_loss


def test_fisher_is_the_mean_of_per_window_squared_gradients(tiny_model_dir):
    model = models.open_model(str(tiny_model_dir))[0]
    rng = np.random.default_rng(0)
    calib = mx.array(rng.integers(0, 200, size=(3, 33)).astype(np.int32))
    path = "model.layers.1.mlp.down_proj.weight"
    F = diagonal_fisher(model, calib, [path, "model.embed_tokens.weight"])
    n_trainable = len(tree_flatten(model.trainable_parameters()))
    assert n_trainable == len(tree_flatten(model.parameters()))  # unfrozen again

    # independent: differentiate the loss w.r.t. that one weight, window by window
    w0 = dict(tree_flatten(model.parameters()))[path]
    lin = model.model.layers[1].mlp.down_proj

    def loss_of(w, toks):
        lin.weight = w
        return window_loss(model, toks)

    grads = [mx.grad(loss_of)(w0, calib[i: i + 1]) for i in range(3)]
    lin.weight = w0
    ref = sum(g * g for g in grads) / 3
    assert np.allclose(np.asarray(F[path]), np.asarray(ref), rtol=1e-4, atol=1e-12)
    sq_of_mean = (sum(grads) / 3) ** 2
    assert not np.allclose(np.asarray(F[path]), np.asarray(sq_of_mean), rtol=1e-2)  # per-sample, not batch
    assert F["model.embed_tokens.weight"].shape == model.model.embed_tokens.weight.shape
    assert float(F[path].min().item()) >= 0.0


def test_fisher_rejects_bad_input(tiny_model_dir):
    model = models.open_model(str(tiny_model_dir))[0]
    with pytest.raises(ValueError):
        diagonal_fisher(model, mx.zeros((0, 16), mx.int32), ["model.embed_tokens.weight"])
    with pytest.raises(KeyError):
        diagonal_fisher(model, mx.zeros((1, 16), mx.int32), ["model.nope.weight"])

