"""Benchmarks of a Tandem deployment (run as modules, e.g. `python -m benchmarks.overhead`)."""
