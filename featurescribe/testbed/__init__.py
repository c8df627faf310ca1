"""Test beds for the judges, kept apart from production code: `planted` builds features with
known rules and true explanations over real tokens (tests and benchmarks use it)."""
