"""The block-by-block compression pipeline.

``capture``: hooks that record a block's inputs and outputs; ``layer``: one layer's format and compression;
``head``: embeddings and the output head; ``run``: the block loop (``run``); ``scan``: a read-only pass for the
allocators.
"""
