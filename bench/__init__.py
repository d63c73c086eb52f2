"""Benchmarks: each prints its figures against a baseline measured in the same run; toy_model for them and the tests."""
