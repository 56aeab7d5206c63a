"""Tools for the tests and benchmarks (TPU compile memory); the library never imports them."""
