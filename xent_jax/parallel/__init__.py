"""Losses with the classes split over a device mesh (vocabulary parallelism)."""
