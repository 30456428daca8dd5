"""Benchmark and evaluation harness for attribution methods on PyTorch image classifiers."""
