"""Losses on a logits array: cross-entropy, its variants, the bi-tempered loss."""
