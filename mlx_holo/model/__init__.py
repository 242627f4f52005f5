"""Everything that knows model files and model structure.

``open``: model specs -> (model, tokenizer, config, ModelInfo); ``files``: reading a folder; ``gguf``: GGUF input;
``save``: mlx-lm folders, atomically; ``structure``: blocks, linears, embeddings and head; ``experts``: MoE layers.
The names below are the ones the rest of the package uses.
"""
from .experts import expert_modules, is_switch, moe_container, routed_rows, router_paths, split_by_expert
from .files import ModelError, cache_dir, load_weights, model_hash, read_config, weight_files
from .gguf import convert_gguf
from .open import (EMBEDDED_ID, ModelInfo, cast_floats, check_architecture, dequantize_model, embedded_default_dir,
                   embedded_gguf, open_model, resolve)
from .save import atomic_dir, replace_tensors, save_compressed, save_replaced
from .structure import (block_prefix, blocks, final_norm, get_module, head_module, linear_modules,
                        outside_quantizable, set_module)

__all__ = ["EMBEDDED_ID", "ModelError", "ModelInfo", "atomic_dir", "block_prefix", "blocks", "cache_dir",
           "cast_floats", "check_architecture", "convert_gguf", "dequantize_model", "embedded_default_dir",
           "embedded_gguf", "expert_modules", "final_norm", "get_module", "head_module", "is_switch",
           "linear_modules", "load_weights", "model_hash", "moe_container", "open_model", "outside_quantizable",
           "read_config", "replace_tensors", "resolve", "routed_rows", "router_paths", "save_compressed",
           "save_replaced", "set_module", "split_by_expert", "weight_files"]
