"""Faultline: a reverse proxy that says who produced every response and where the fault lies."""

__version__ = "0.1.0"


def compiled() -> bool:
    """True when the per-exchange modules run compiled by mypyc (setup.py, FAULTLINE_COMPILE=1),
    False when they run as the interpreted sources."""
    from . import forward

    return not (forward.__file__ or "").endswith(".py")
