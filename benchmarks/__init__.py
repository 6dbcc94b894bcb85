"""Benchmarks: scripts that print tables and JSON; performance goals live here, not in tests."""
