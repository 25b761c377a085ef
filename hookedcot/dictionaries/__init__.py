"""Readers of the residual stream: dictionaries (SAEs) attached by hook name, and the tuned lens."""
