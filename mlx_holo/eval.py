"""python -m mlx_holo.eval: score a model against its base (``mlx_holo.cli.eval``)."""
import sys

if __name__ == "__main__":
    from .cli.eval import main
    sys.exit(main())
