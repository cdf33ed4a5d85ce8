"""Benchmarks: Flax vs PyTorch Darknet-53 on one device (`python -m bench.benchmark`), see bench/NOTES.md."""
