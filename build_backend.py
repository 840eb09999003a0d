"""setuptools' build backend, plus mypy (it carries mypyc) as a build requirement only when
FAULTLINE_COMPILE=1 asks setup.py to compile: an interpreted install downloads nothing
more. The pattern is setuptools' own ("Dynamic build dependencies", build_meta docs)."""

import contextlib
import os
from collections.abc import Iterator

from setuptools import build_meta
from setuptools.build_meta import *  # noqa: F403 - every hook not redefined below

MYPYC = ["mypy==2.4.1"]  # the version the compiled modules are tested with (.ci/run)


@contextlib.contextmanager
def _not_compiling() -> Iterator[list[str]]:
    """setuptools runs setup.py to ask for its requirements, before mypyc is installed:
    that run must not compile. Yields what compiling will need."""
    asked = os.environ.pop("FAULTLINE_COMPILE", None)
    try:
        yield MYPYC if asked == "1" else []
    finally:
        if asked is not None:
            os.environ["FAULTLINE_COMPILE"] = asked


def get_requires_for_build_wheel(config_settings=None):
    with _not_compiling() as extra:
        return build_meta.get_requires_for_build_wheel(config_settings) + extra


def get_requires_for_build_editable(config_settings=None):
    with _not_compiling() as extra:
        return build_meta.get_requires_for_build_editable(config_settings) + extra
