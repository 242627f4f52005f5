"""mlx-holo: an MLX-native LLM compression workbench.

The public API, loaded on first use (so that ``import mlx_holo`` stays light)::

    from mlx_holo import compress, evaluate, Recipe
    ev = compress("default", Recipe(method="gptq", bits=4), "runs/smollm2-gptq4")   # -> evidence dict
    m = evaluate("runs/smollm2-gptq4", base="default", eval_tokens=2048)             # -> metrics dict

``compress`` is ``mlx_holo.compression.compress`` and ``evaluate`` is ``mlx_holo.evaluation.evaluate``
(``mlx_holo/compress.py`` is only the ``python -m mlx_holo.compress`` entry point).
"""
from importlib import import_module

__version__ = "0.2.0"
__all__ = ["Recipe", "compress", "evaluate"]
_API = {"compress": ".compression", "evaluate": ".evaluation", "Recipe": ".recipe"}


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'mlx_holo' has no attribute {name!r}")
    obj = getattr(import_module(_API[name], __name__), name)
    globals()[name] = obj
    return obj
