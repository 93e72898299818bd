"""Test and benchmark helpers shared by tests/ and tools/ (importable as tests.helpers)."""
