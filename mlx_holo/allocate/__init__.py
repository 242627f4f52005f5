"""Allocation: how many bits (and which group size) each layer gets, and how sparse each block is.

``bits``: the multiple-choice knapsack over per-layer costs; ``fisher`` / ``measured``: the end-to-end
sensitivities; ``mixed``: the driver that computes a recipe's sensitivities and solves the knapsack; ``owl`` /
``zero_order``: per-block sparsity ratios; ``sparsity``: the driver for the pruners.
"""
