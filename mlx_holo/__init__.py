"""mlx-holo: an MLX-native LLM compression workbench."""

__version__ = "0.1.0"
