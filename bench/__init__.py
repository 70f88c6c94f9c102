"""Benchmarks that print tables and write JSON, each run as `python -m bench.<name>`."""
