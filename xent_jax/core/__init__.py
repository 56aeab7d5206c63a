"""The conventions and the engine every loss shares: checks, inputs, reduction, statistics."""
