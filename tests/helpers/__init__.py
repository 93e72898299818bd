"""Helpers shared by the tests and the tools/ benchmarks."""
