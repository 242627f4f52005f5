"""Textual front end of mlx-holo (`python -m mlx_holo.tui`). The only package allowed to import Textual."""
