"""Benchmarks of django-isolatable against raw locks and its peers: ``python benchmarks/run.py``."""
