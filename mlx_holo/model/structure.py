"""Model structure: the transformer blocks, their prefix, module lookup by path, the linears to compress, the
layers outside the blocks (embeddings, head), experts (``experts.py``).

Works on any decoder-only model mlx-lm builds (``model.model.layers`` or ``model.layers``).
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from ..quant.formats import fit_group
from .experts import router_paths
from .files import ModelError


def blocks(model: nn.Module) -> list[nn.Module]:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ModelError(f"{type(model).__name__} has no .model.layers: not a decoder-only LM mlx-holo knows")
    return list(layers)


def block_prefix(model: nn.Module) -> str:
    """The parameter path of the block list ("model.layers" for llama/qwen-style models)."""
    layers = blocks(model)
    for path, m in model.named_modules():
        if m is layers[0]:
            return path.rsplit(".", 1)[0]
    return "model.layers"


def get_module(root: nn.Module, path: str) -> nn.Module:
    """The module at a dotted path below ``root`` ("self_attn.q_proj", "model.layers.3.mlp")."""
    m = root
    for part in path.split("."):
        m = m[int(part)] if isinstance(m, list) else getattr(m, part)
    return m


def find_module(root: nn.Module, path: str) -> nn.Module | None:
    """The module at a dotted path below ``root``, or None where any part of the path is missing."""
    m = root
    for part in path.split("."):
        if isinstance(m, list):
            m = m[int(part)] if part.isdigit() and int(part) < len(m) else None
        else:
            m = getattr(m, part, None)
        if m is None:
            return None
    return m


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at a dotted path below ``root``."""
    parent_path, _, name = path.rpartition(".")
    parent = get_module(root, parent_path) if parent_path else root
    if isinstance(parent, list):
        parent[int(name)] = module
    else:
        setattr(parent, name, module)


def linear_modules(block: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The block's nn.Linear layers to compress, in call order; a MoE router stays float (``experts.py``)."""
    routers = router_paths(block)
    return [(p, m) for p, m in block.named_modules() if isinstance(m, nn.Linear) and p not in routers][::-1]


def outside_quantizable(model: nn.Module, recipe) -> list[tuple[str, mx.array]]:
    """(weight path, tensor) of the layers outside the blocks that the recipe quantizes: embeddings (unless
    ``quantize_embeddings`` is off) and an untied lm_head, when their width fits the group size."""
    if recipe.bits is None:
        return []
    prefix = block_prefix(model)
    out = []
    for k, v in tree_flatten(model.parameters()):
        if k.startswith(prefix + ".") or v.size == 0 or not k.endswith(".weight"):
            continue
        m = get_module(model, k.rsplit(".", 1)[0])
        if (isinstance(m, nn.Linear) or (recipe.quantize_embeddings and isinstance(m, nn.Embedding))) \
                and fit_group(v.shape[-1], recipe.group_size) is not None:
            out.append((k, v))
    return out


def head_module(model: nn.Module, mod: str) -> bool:
    """Is ``mod`` the output head's weight: an untied lm_head, or the embedding that the head reads when tied?"""
    m = get_module(model, mod)
    if isinstance(m, nn.Linear):
        return True
    return isinstance(m, nn.Embedding) and not hasattr(model, "lm_head")


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm between the last block and the head (the ``norm`` beside the blocks, as llama/qwen-style models
    name it), or None."""
    prefix = block_prefix(model)
    parent = get_module(model, prefix.rsplit(".", 1)[0]) if "." in prefix else model
    return getattr(parent, "norm", None)


def release_block(block: nn.Module) -> None:
    """Drop a finished block's tensors (each replaced by an empty array): what bounds memory to about one block."""
    block.update(tree_map(lambda a: mx.zeros((0,), a.dtype), block.parameters()))


def drop_input_embedding(model: nn.Module) -> bool:
    """Free the input embedding table of a model whose head has its own weight (an untied lm_head) once the block
    inputs are computed: the table (float or quantized) becomes a one-row stand-in (the forward still builds the
    lookup, which nothing then evaluates). -> whether it was dropped."""
    inner = getattr(model, "model", model)
    emb = getattr(inner, "embed_tokens", None)
    if not hasattr(model, "lm_head") or not isinstance(emb, (nn.Embedding, nn.QuantizedEmbedding)):
        return False
    emb.update({k: mx.zeros((1, v.shape[-1]), v.dtype) for k, v in emb.items() if isinstance(v, mx.array)})
    return True
