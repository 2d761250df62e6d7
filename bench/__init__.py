"""Benchmarks and quality checks run by hand (python -m bench.<name>); not imported by the app."""
