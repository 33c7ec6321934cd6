"""Benchmarks: timings live here, never in tests. ``make bench`` runs them (bench/run.py)."""
