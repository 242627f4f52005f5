"""Frozen-code training: per-group scales and biases tuned with the integer codes fixed.

``codes``: the code-frozen layers; ``optim``: per-tensor Adam, KL to the base, held-out split; ``block``: block-wise
reconstruction (BRECQ-style); ``e2e``: end-to-end KL tuning (EfficientQAT's E2E-QP). ``mlx_holo.replicate`` tunes
its ensembles with the same optimiser.
"""
