"""Quantizers. Every quantizer returns MLX affine triples: w ~= scales * codes + biases per group."""
