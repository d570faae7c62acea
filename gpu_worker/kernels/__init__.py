"""Triton kernels for the worker's hot path, each with a plain-torch twin that the CPU runs
and the tests compare against."""
