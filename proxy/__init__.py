"""Faultline: a reverse proxy that says who produced every response and where the fault lies."""

__version__ = "0.1.0"
