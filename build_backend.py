"""setuptools' build backend, plus what mypyc needs only when FAULTLINE_COMPILE=1 asks
setup.py to compile: an interpreted install downloads nothing more. The pattern is
setuptools' own ("Dynamic build dependencies", build_meta docs).

mypyc type-checks the whole package before it compiles, inside pip's isolated build
environment: it needs mypy and every package the code imports. Both come from
pyproject.toml (the runtime `dependencies` and the `compile` extra), never from a second
list kept here. Only building a wheel compiles: metadata and the sdist are prepared with
FAULTLINE_COMPILE cleared, before mypy and the dependencies are there."""

import contextlib
import os
import tomllib
from collections.abc import Iterator
from pathlib import Path

from setuptools import build_meta
from setuptools.build_meta import *  # noqa: F403 - every hook not redefined below


def compile_requirements() -> list[str]:
    """The runtime dependencies plus the `compile` extra (mypy, which carries mypyc)."""
    with (Path(__file__).resolve().parent / "pyproject.toml").open("rb") as f:
        project = tomllib.load(f)["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["compile"]]


def _compiling() -> bool:
    return os.environ.get("FAULTLINE_COMPILE") == "1"


@contextlib.contextmanager
def _not_compiling() -> Iterator[None]:
    """setuptools runs setup.py for requirements, metadata and the sdist: those runs must
    not compile (mypyc and the packages it type-checks against may not be installed)."""
    asked = os.environ.pop("FAULTLINE_COMPILE", None)
    try:
        yield
    finally:
        if asked is not None:
            os.environ["FAULTLINE_COMPILE"] = asked


def get_requires_for_build_wheel(config_settings=None):
    extra = compile_requirements() if _compiling() else []
    with _not_compiling():
        return build_meta.get_requires_for_build_wheel(config_settings) + extra


def get_requires_for_build_editable(config_settings=None):
    extra = compile_requirements() if _compiling() else []
    with _not_compiling():
        return build_meta.get_requires_for_build_editable(config_settings) + extra


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    with _not_compiling():
        return build_meta.prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    with _not_compiling():
        return build_meta.prepare_metadata_for_build_editable(metadata_directory, config_settings)


def get_requires_for_build_sdist(config_settings=None):
    with _not_compiling():
        return build_meta.get_requires_for_build_sdist(config_settings)


def build_sdist(sdist_directory, config_settings=None):
    with _not_compiling():
        return build_meta.build_sdist(sdist_directory, config_settings)
