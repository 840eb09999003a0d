"""The two builds of the package: interpreted sources, or the per-exchange modules compiled
by mypyc (setup.py with FAULTLINE_COMPILE=1). .ci/run tests both and says which one it
expects, so a run can never pass on the other build by accident."""

from __future__ import annotations

import ast
import importlib
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from proxy.cli import compiled, stale_compiled

ROOT = Path(__file__).resolve().parent.parent


def constant(file: str, name: str) -> list[str]:
    """A list assigned at the top of a build file, read without running it (neither needs
    to be importable where the tests run: setuptools may be missing)."""
    tree = ast.parse((ROOT / file).read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == name:
            return ast.literal_eval(node.value)
    raise AssertionError(f"{file} has no {name}")


def compiled_sources() -> list[str]:
    return constant("setup.py", "COMPILED")


def test_the_build_under_test_is_the_one_expected():
    expected = os.environ.get("FAULTLINE_EXPECT_COMPILED")
    if expected is None:
        pytest.skip("FAULTLINE_EXPECT_COMPILED is not set (.ci/run sets it)")
    assert compiled() is (expected == "1")


def test_no_compiled_module_is_older_than_its_source():
    """A compiled copy built in place shadows its source: tests would pass on old code."""
    assert stale_compiled() == [], "rebuild (FAULTLINE_COMPILE=1 pip install -e .) or rm *.so"


def test_every_listed_module_is_one_build_or_the_other():
    sources = compiled_sources()
    assert sources and all((ROOT / s).is_file() for s in sources)
    for source in sources:
        module = importlib.import_module(source.removesuffix(".py").replace("/", "."))
        is_extension = not module.__file__.endswith(".py")
        assert is_extension is compiled(), f"{source}: a mix of builds"


def test_the_compiler_is_the_mypy_that_lints():
    """mypyc's output depends on its version: the build compiles with the `compile` extra,
    and the test extra (what .ci/run lints with) takes that same extra, not a copy."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    pins = [r for r in extras["compile"] if r.startswith("mypy")]
    assert len(pins) == 1 and "==" in pins[0], extras["compile"]
    test = [r.split("#")[0].strip() for r in extras["test"]]
    assert "faultline[compile]" in test
    assert not [r for r in test if r.startswith("mypy")], "a second mypy pin in the test extra"


def test_compiling_needs_what_the_code_imports_and_nothing_kept_twice():
    """In pip's isolated build environment mypyc type-checks against the packages the code
    imports: the build asks for the runtime dependencies plus the `compile` extra, read from
    pyproject.toml. A plain build asks for neither."""
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:  # pyproject.toml's build requirement
        pytest.skip(f"setuptools {setuptools.__version__} here; the build asks for >= 77")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    code = (
        "import build_backend as b, json;"
        "print(json.dumps([b.compile_requirements(), b.get_requires_for_build_wheel()]))"
    )
    for flag, expect_extra in (("1", True), ("0", False)):
        env = {**os.environ, "FAULTLINE_COMPILE": flag}
        res = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert res.returncode == 0, res.stderr
        needed, asked = json.loads(res.stdout.splitlines()[-1])
        assert needed == [*project["dependencies"], *project["optional-dependencies"]["compile"]]
        assert all(r in asked for r in needed) is expect_extra, (flag, asked)


def test_a_source_edited_after_compiling_is_named(tmp_path):
    """stale_compiled() on a work tree: a module whose .py is newer than its .so, in any
    sub-package."""
    package = tmp_path / "proxy"
    (package / "forward").mkdir(parents=True)
    shutil.copy2(ROOT / "proxy" / "__init__.py", package / "__init__.py")
    shutil.copy2(ROOT / "proxy" / "cli.py", package / "cli.py")
    for name, when in (("forward/forwarder", 1_000), ("forward/pool", 3_000)):
        (package / f"{name}.py").write_text("")
        os.utime(package / f"{name}.py", (2_000, 2_000))
        library = package / f"{name}.cpython-311-x86_64-linux-gnu.so"
        library.write_bytes(b"")
        os.utime(library, (when, when))  # forwarder compiled before its edit, pool after
    res = subprocess.run(
        [sys.executable, "-c", "from proxy.cli import stale_compiled; print(stale_compiled())"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.stdout.strip() == "['forward/forwarder.py']", res.stdout + res.stderr
