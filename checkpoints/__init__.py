"""Artifacts gankit ships (the metric classifier), installed as package data and read with
importlib.resources."""
