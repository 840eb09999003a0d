"""The house (ARCHITECTURE.md): module size, a package root that imports nothing, and the
import contracts of pyproject.toml, proven to bite: `lint-imports` is run on a copy of the
package with one forbidden import added, and must fail naming it.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "proxy"
MAX_LINES = 450
LINT_IMPORTS = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")


def test_no_module_is_over_450_lines():
    long = {
        str(path.relative_to(ROOT)): n
        for path in PACKAGE.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_the_package_root_holds_the_version_and_imports_nothing():
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    imports = [node for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)]
    assert imports == []
    assert any(
        isinstance(node, ast.Assign) and node.targets[0].id == "__version__"  # type: ignore[attr-defined]
        for node in tree.body
    )


def _lint(tmp_path: Path, edit: tuple[str, str, str] | None) -> subprocess.CompletedProcess:
    """lint-imports with this repository's contracts on a copy of the package."""
    shutil.copytree(
        PACKAGE, tmp_path / "proxy", ignore=shutil.ignore_patterns("*.so", "__pycache__")
    )
    if edit is not None:
        module, anchor, added = edit
        path = tmp_path / module
        text = path.read_text()
        assert anchor in text
        path.write_text(text.replace(anchor, anchor + added, 1))
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    lines = [f'root_package = "{config["root_package"]}"']
    lines.append(f"include_external_packages = {str(config['include_external_packages']).lower()}")
    toml = "[tool.importlinter]\n" + "\n".join(lines) + "\n"
    for contract in config["contracts"]:
        toml += "\n[[tool.importlinter.contracts]]\n"
        for key, value in contract.items():
            toml += f"{key} = {_toml(value)}\n"
    (tmp_path / "pyproject.toml").write_text(toml)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    return subprocess.run(
        [LINT_IMPORTS, "--no-cache", "--config", str(tmp_path / "pyproject.toml")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _toml(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


@pytest.mark.skipif(not Path(LINT_IMPORTS).exists(), reason="import-linter is not installed")
def test_the_contracts_hold_on_the_package_as_it_is(tmp_path):
    result = _lint(tmp_path, None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" not in result.stdout.split("Contracts:")[-1].replace("0 broken", "")


@pytest.mark.skipif(not Path(LINT_IMPORTS).exists(), reason="import-linter is not installed")
@pytest.mark.parametrize(
    ("edit", "broken"),
    [
        (  # diagnosis is pure: it may not know the HTTP/1.1 codec
            ("proxy/diagnosis/record.py", "\nimport time\n", "from proxy.http1 import headers\n"),
            ["Imports point down the layers", "No import cycle"],
        ),
        (  # ... nor an I/O library
            ("proxy/diagnosis/classify.py", "\nimport errno\n", "import socket\n"),
            ["diagnosis is pure"],
        ),
        (  # the core imports no sink
            ("proxy/forward/state.py", "\nimport logging\n", "from ..telemetry import sink\n"),
            ["imports no codec, no protocol library and no sink"],
        ),
        (  # the two sides of the HTTP/1.1 codec meet only in the core
            ("proxy/http1/origin.py", "\nimport asyncio\n", "from . import client\n"),
            ["meet only in the core"],
        ),
        (  # a cycle inside one package, hidden behind TYPE_CHECKING
            (
                "proxy/forward/context.py",
                "if TYPE_CHECKING:\n",
                "    from .forwarder import Forwarder\n",
            ),
            ["No import cycle"],
        ),
    ],
    ids=["diagnosis-http1", "diagnosis-socket", "core-telemetry", "codec-sides", "cycle"],
)
def test_a_forbidden_import_breaks_the_contracts(tmp_path, edit, broken):
    result = _lint(tmp_path, edit)
    assert result.returncode != 0, result.stdout
    for name in broken:
        assert f"{name}" in result.stdout and "BROKEN" in result.stdout, result.stdout
