"""Losses on a linear layer's logits without building them: blocks, kernels, ops, schedules."""
