"""Benchmarks of predictopt (not part of the installed package); see ``docs/benchmarks.md``."""
