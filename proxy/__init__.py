"""Faultline: a reverse proxy that says who produced every response and where the fault lies.

The package is layered (ARCHITECTURE.md): this module holds the version and imports none
of its sub-packages.
"""

__version__ = "0.1.0"
