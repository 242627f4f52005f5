"""python -m mlx_holo.compress: compress a model (``mlx_holo.cli.compress``; the function is
``mlx_holo.compression.compress``, also ``from mlx_holo import compress``)."""
import sys

if __name__ == "__main__":
    from .cli.compress import main
    sys.exit(main())
