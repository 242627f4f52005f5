"""python -m mlx_holo.validate: check evidence files (``mlx_holo.cli.validate``)."""
import sys

if __name__ == "__main__":
    from .cli.validate import main
    sys.exit(main())
