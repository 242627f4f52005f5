"""The command-line entry points: thin layers over the library, one module per command (``main.py`` is the
``mlx-holo`` dispatcher; ``common.py`` holds exit codes, the progress line and the recipe's generated flags)."""
