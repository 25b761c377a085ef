"""Interpretability tools built only on the public hook API."""
