"""The two builds of the package: interpreted sources, or the per-exchange modules compiled
by mypyc (setup.py with FAULTLINE_COMPILE=1). .ci/run tests both and says which one it
expects, so a run can never pass on the other build by accident."""

from __future__ import annotations

import ast
import importlib
import os
from pathlib import Path

import pytest

from proxy import compiled

ROOT = Path(__file__).resolve().parent.parent


def compiled_sources() -> list[str]:
    """setup.py's COMPILED list, read without running setup.py."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "COMPILED":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no COMPILED list")


def test_the_build_under_test_is_the_one_expected():
    expected = os.environ.get("FAULTLINE_EXPECT_COMPILED")
    if expected is None:
        pytest.skip("FAULTLINE_EXPECT_COMPILED is not set (.ci/run sets it)")
    assert compiled() is (expected == "1")


def test_every_listed_module_is_one_build_or_the_other():
    sources = compiled_sources()
    assert sources and all((ROOT / s).is_file() for s in sources)
    for source in sources:
        module = importlib.import_module(source.removesuffix(".py").replace("/", "."))
        is_extension = not module.__file__.endswith(".py")
        assert is_extension is compiled(), f"{source}: a mix of builds"


def test_the_compiler_is_the_mypy_that_lints():
    """mypyc's output depends on its version: the build pins the one .ci/run lints with."""
    import tomllib

    import build_backend

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lint = [r.split("#")[0].strip() for r in extras["optional-dependencies"]["test"]]
    assert [r for r in lint if r.startswith("mypy")] == build_backend.MYPYC
