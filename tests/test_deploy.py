"""Deployment artefacts, each checked with the real tool that consumes it.

- Dockerfile: hadolint; its shape (stages, user, entrypoint, read-only friendliness);
  its install steps replayed without Docker (wheel -> fresh venv -> console script).
- k8s/: rendered by kustomize (`kubectl kustomize`, or a standalone `kustomize`);
  core kinds validated by `kubernetes-validate --strict` for Kubernetes 1.29 (the first
  release with native sidecars on by default) and for the newest version the installed
  kubernetes-validate knows; the Prometheus Operator objects checked structurally.
- Alerts: `promtool check rules` and `promtool test rules` (k8s/alerts/*test*.yaml);
  the PrometheusRule and the plain rules file must carry identical groups.
- Grafana dashboard: every PromQL expression parses (`promtool check rules` on a
  generated file of recording rules, Grafana variables substituted).
- Once proxy/cli.py exists: `faultline --help`, `faultline check-config` on the
  sidecar's configuration, and `faultline serve` from the fresh venv passing a request.

A missing tool skips its test with a reason; with FAULTLINE_REQUIRE_TOOLS=1 (CI) it fails.
Tests are synchronous; servers started here listen on 127.0.0.1 only and are stopped
by PID (or, for the in-process origin, by shutdown()).
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from support import free_port

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
K8S = ROOT / "k8s"
ALERTS = K8S / "alerts" / "faultline-alerts.rules.yaml"
DASHBOARD = K8S / "grafana" / "faultline-dashboard.json"
SIDECAR_CONFIG = K8S / "faultline.yaml"
CLI_EXISTS = (ROOT / "proxy" / "cli.py").exists()
NEEDS_CLI = pytest.mark.skipif(
    not CLI_EXISTS, reason="proxy/cli.py does not exist yet: the faultline command has no CLI"
)

REQUIRE_TOOLS = os.environ.get("FAULTLINE_REQUIRE_TOOLS") == "1"

# The tokens the alerts must cover (CONTRACT.md's fault table).
CONNECT_FAILURES = {
    "connection_refused",
    "connection_timeout",
    "dns_error",
    "dns_timeout",
    "tls_certificate_error",
    "tls_protocol_error",
}
UPSTREAM_TIMEOUTS = {"http_response_timeout", "connection_read_timeout", "connection_timeout"}

# The configuration keys of CONTRACT.md; the sidecar's faultline.yaml may use no other.
CONFIG_KEYS = {
    "listen": None,
    "upstream": None,
    "proxy_name": None,
    "upstream_wait": None,
    "admin": {"listen": None, "token": None},
    "timeouts": {
        k: None
        for k in (
            "connect",
            "response_headers",
            "upstream_read",
            "client_headers",
            "client_body",
            "keepalive",
            "drain",
            "shutdown_delay",
        )
    },
    "limits": {
        k: None
        for k in (
            "max_in_flight",
            "max_request_header_bytes",
            "max_request_body_bytes",
            "max_response_header_bytes",
        )
    },
    "headers": {k: None for k in ("proxy_status", "server_timing", "forwarded", "via")},
    "log": {"format": None, "access": None},
}


# ----------------------------------------------------------------------------- helpers


def tool(*names: str) -> str:
    """The first of `names` on PATH; skip (or fail under FAULTLINE_REQUIRE_TOOLS=1) if none."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    msg = f"{' or '.join(names)} not found on PATH (CI installs it: see .ci/run)"
    if REQUIRE_TOOLS:
        pytest.fail(f"{msg}, and FAULTLINE_REQUIRE_TOOLS=1")
    pytest.skip(msg)


def run(cmd: list[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def seconds(duration: str | float | int) -> float:
    """A Faultline duration (250ms, 5s, 2m, or a number of seconds) in seconds."""
    if isinstance(duration, (int, float)):
        return float(duration)
    m = re.fullmatch(r"\s*([0-9.]+)\s*(ms|s|m)?\s*", str(duration))
    assert m, f"not a duration: {duration!r}"
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[m.group(2)]


def sidecar_config() -> dict:
    return yaml.safe_load(SIDECAR_CONFIG.read_text())


# ----------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        instr, _, args = buf.strip().partition(" ")
        out.append((instr.upper(), " ".join(args.split())))
        buf = ""
    return out


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instr, args in dockerfile_instructions():
        if instr == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instr, args))
    return stages


# The build stage's install steps, as tests/test_deploy.py replays them outside Docker
# ({dist} = the wheel directory, {venv} = the virtual environment).
INSTALL_STEPS = [
    "FAULTLINE_COMPILE=1 pip wheel --no-cache-dir --no-deps --wheel-dir {dist} .",
    "python -m venv {venv}",
    "{venv}/bin/pip install --no-cache-dir {dist}/faultline-*.whl",
    "{venv}/bin/python -m pip uninstall -y -q pip setuptools",
    "{venv}/bin/faultline --help > /dev/null",
]
DOCKER_PATHS = {"dist": "/dist", "venv": "/opt/faultline"}


def test_hadolint_clean():
    hadolint = tool("hadolint")
    res = run([hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)])
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr


def test_dockerfile_shape():
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: a build stage and a runtime stage"
    args = {
        a.split("=", 1)[0]: a.split("=", 1)[1]
        for i, a in dockerfile_instructions()
        if i == "ARG" and "=" in a
    }

    def base(stage):
        image = stage[0][1].split()[0]
        return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), image)

    for stage in stages:
        m = re.fullmatch(r"python:3\.(\d+)-slim(-\w+)?", base(stage))
        assert m and int(m.group(1)) >= 11, f"slim Python >= 3.11 base, got {base(stage)}"

    final = stages[-1]
    final_text = "\n".join(f"{i} {a}" for i, a in final)
    # No build tools (compilers, package managers' build deps) in the final image.
    assert not re.search(r"apt-get|apk |gcc|build-essential|pip wheel|python -m build", final_text)
    assert any(i == "COPY" and "--from=build" in a for i, a in final), "copies the built venv"

    users = [a for i, a in final if i == "USER"]
    assert users, "the runtime stage sets USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0 and (not gid or gid.isdigit()), users[-1]

    env = " ".join(a for i, a in final if i == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "FAULTLINE_CONFIG=/etc/faultline/faultline.yaml" in env
    assert ("ENTRYPOINT", '["faultline"]') in final
    assert ("CMD", '["serve"]') in final
    exposed = {p for i, a in final if i == "EXPOSE" for p in a.split()}
    assert {"8080", "9901"} <= exposed

    # The build stage's install steps are the ones test_wheel_installs_into_fresh_venv replays.
    build_runs = [a for i, a in stages[0] if i == "RUN" and "pip wheel" in a]
    assert len(build_runs) == 1, build_runs
    steps = [s.strip() for s in build_runs[0].split("&&")]
    assert steps == [s.format(**DOCKER_PATHS) for s in INSTALL_STEPS], (
        "the Dockerfile's install steps changed: update INSTALL_STEPS in tests/test_deploy.py"
    )


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    excluded = False
    for raw in DOCKERIGNORE.read_text().splitlines():
        pat = raw.strip()
        if not pat or pat.startswith("#"):
            continue
        negate = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        rx = re.escape(pat).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        rx = rx.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        parts = path.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        if any(re.fullmatch(rx, p) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_only_the_build_inputs():
    copied = []
    for instr, args in dockerfile_stages()[0]:
        if instr == "COPY" and "--from" not in args:
            copied += args.split()[:-1]
    inputs = {"pyproject.toml", "build_backend.py", "setup.py", "README.md", "proxy"}
    assert set(copied) == inputs, copied
    for path in (*inputs - {"proxy"}, "proxy/__init__.py", "proxy/cli.py"):
        assert not dockerignore_excludes(path), f"{path} is excluded from the build context"
    for path in (
        ".git/HEAD",
        "tests/test_deploy.py",
        "k8s/deployment.yaml",
        "bench/x.py",
        "proxy/__pycache__/cli.cpython-312.pyc",
        "proxy/forward.cpython-311-x86_64-linux-gnu.so",  # a compiled work tree
        "build/lib/x.py",
        ".ci/run",
    ):
        assert dockerignore_excludes(path), f"{path} should not be in the build context"


def test_dockerfile_copy_sources_exist():
    missing = [
        p
        for p in ("pyproject.toml", "build_backend.py", "setup.py", "proxy", "README.md")
        if not (ROOT / p).exists()
    ]
    if missing == ["README.md"]:
        pytest.skip("README.md is not written yet; the Docker build COPYs it (project metadata)")
    assert not missing, f"the Dockerfile COPYs files that do not exist: {missing}"


# ----------------------------------------------------------------------------- install path


@pytest.fixture(scope="module")
def faultline_venv(tmp_path_factory) -> Path:
    """Replays the Dockerfile's build stage outside Docker: the COPYs into a clean context,
    then INSTALL_STEPS (but the last, `faultline --help`, which needs the CLI) with `python`
    and `pip` from a fresh virtual environment with nothing installed, as on the image's
    base: the compiled build must not lean on packages the test run happens to have."""
    base = tmp_path_factory.mktemp("image")
    ctx, dist, venv = base / "src", base / "dist", base / "opt-faultline"
    clean = base / "clean-python"
    res = run([sys.executable, "-m", "venv", str(clean)], timeout=120)
    assert res.returncode == 0, res.stderr
    ctx.mkdir()
    for name in ("pyproject.toml", "build_backend.py", "setup.py", "README.md"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, ctx / name)
    shutil.copytree(
        ROOT / "proxy",
        ctx / "proxy",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"),
    )
    env = dict(
        os.environ,
        PATH=f"{clean / 'bin'}{os.pathsep}{os.environ['PATH']}",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PIP_NO_INPUT="1",
    )
    env.pop("VIRTUAL_ENV", None)
    for step in INSTALL_STEPS[:-1]:
        cmd = step.format(dist=shlex.quote(str(dist)), venv=shlex.quote(str(venv)))
        res = run(["bash", "-c", cmd], timeout=300, cwd=ctx, env=env)
        assert res.returncode == 0, f"{cmd}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return venv


def test_wheel_installs_into_fresh_venv(faultline_venv):
    script = faultline_venv / "bin" / "faultline"
    assert script.is_file() and os.access(script, os.X_OK), "console script `faultline` missing"
    # The console script runs the venv's own interpreter, not the one running the tests.
    assert script.read_text().splitlines()[0].startswith(f"#!{faultline_venv}")
    res = run(
        [
            str(faultline_venv / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('faultline'))",
        ]
    )
    assert res.returncode == 0 and res.stdout.strip(), res.stderr
    # Installed from the wheel, not linked to the work tree.
    res = run(
        [str(faultline_venv / "bin" / "python"), "-c", "import proxy; print(proxy.__file__)"],
        cwd="/",
    )
    assert res.returncode == 0 and "site-packages" in res.stdout, res.stdout + res.stderr
    # The image's build: the per-exchange modules compiled (setup.py, FAULTLINE_COMPILE=1).
    res = run(
        [
            str(faultline_venv / "bin" / "python"),
            "-c",
            "from proxy.cli import compiled; print(compiled())",
        ],
        cwd="/",
    )
    assert res.stdout.strip() == "True", res.stdout + res.stderr
    # Nothing at run time needs an installer: pip and setuptools left the venv.
    res = run([str(faultline_venv / "bin" / "python"), "-c", "import pip"], cwd="/")
    assert res.returncode != 0 and "No module named 'pip'" in res.stderr, res.stdout + res.stderr


@NEEDS_CLI
def test_faultline_help_runs_from_venv(faultline_venv):
    cmd = INSTALL_STEPS[-1].format(venv=shlex.quote(str(faultline_venv)))
    res = run(["bash", "-c", cmd.replace("> /dev/null", "")], timeout=30)
    assert res.returncode == 0, res.stderr
    assert "serve" in res.stdout


@NEEDS_CLI
def test_sidecar_config_passes_check_config(faultline_venv):
    res = run(
        [str(faultline_venv / "bin" / "faultline"), "check-config", str(SIDECAR_CONFIG)],
        timeout=30,
        env={k: v for k, v in os.environ.items() if not k.startswith("FAULTLINE_")},
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_python_build_makes_an_sdist_and_a_wheel_that_install_in_clean_venvs(tmp_path):
    """`python -m build`: an sdist (carrying the in-tree build backend) and a wheel built
    from it; each installs into its own clean venv and runs `faultline check-config`."""
    pytest.importorskip("build", reason="the `build` package (test extra) is not installed")
    dist = tmp_path / "dist"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAULTLINE_")}
    res = run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], 300, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    sdists, wheels = sorted(dist.glob("faultline-*.tar.gz")), sorted(dist.glob("faultline-*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(p.name for p in dist.iterdir())
    for artefact in (sdists[0], wheels[0]):
        venv = tmp_path / f"venv-{artefact.suffix.lstrip('.')}"
        assert run([sys.executable, "-m", "venv", str(venv)], 120).returncode == 0
        res = run([str(venv / "bin" / "pip"), "install", "-q", str(artefact)], 300, env=env)
        assert res.returncode == 0, f"{artefact.name}: {res.stdout[-2000:]}{res.stderr[-2000:]}"
        res = run(
            [str(venv / "bin" / "faultline"), "check-config", str(SIDECAR_CONFIG)], env=env, cwd="/"
        )
        assert res.returncode == 0, f"{artefact.name}: {res.stdout}{res.stderr}"


class _Origin(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello from the origin: {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _get(url: str, timeout: float = 3) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture(scope="module")
def served(faultline_venv, tmp_path_factory):
    """A tiny origin on 127.0.0.1 (free port) and the venv's `faultline serve` in front of
    it on 127.0.0.1 (free ports), with the sidecar's own configuration file: the flags
    move it onto the test ports, the environment shortens its shutdown. Yields
    (proxy URL, admin URL, log file); stops both by PID / shutdown()."""
    if not CLI_EXISTS:
        pytest.skip("proxy/cli.py does not exist yet: the faultline command has no CLI")
    origin = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Origin)
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    listen, admin = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAULTLINE_")}
    env.update(FAULTLINE_TIMEOUTS_SHUTDOWN_DELAY="0s", FAULTLINE_TIMEOUTS_DRAIN="2s")
    workdir = tmp_path_factory.mktemp("serve")
    log = (workdir / "faultline.log").open("w+")
    proc = subprocess.Popen(
        [
            str(faultline_venv / "bin" / "faultline"),
            "serve",
            "--config",
            str(SIDECAR_CONFIG),
            "--upstream",
            f"http://127.0.0.1:{origin.server_address[1]}",
            "--listen",
            f"127.0.0.1:{listen}",
            "--admin",
            f"127.0.0.1:{admin}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=workdir,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, f"faultline exited early: {_tail(log)}"
            try:
                if _get(f"http://127.0.0.1:{admin}/readyz", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"/readyz never turned 200: {_tail(log)}"
            time.sleep(0.1)
        yield f"http://127.0.0.1:{listen}", f"http://127.0.0.1:{admin}", log
    finally:
        # Graceful shutdown has its own tests; here it only has to end, by PID.
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        origin.shutdown()
        origin.server_close()
        log.close()


def test_serve_from_venv_passes_a_request(served):
    proxy, _, log = served
    status, headers, body = _get(f"{proxy}/through-the-sidecar")
    assert status == 200, (status, body, _tail(log))
    assert body == b"hello from the origin: /through-the-sidecar\n"
    proxy_status = {k.lower(): v for k, v in headers.items()}.get("proxy-status", "")
    assert "example-app;" in proxy_status, headers  # proxy_name from k8s/faultline.yaml
    assert "received-status=200" in proxy_status, headers


METRICS_IN_SOURCE = any(
    "faultline_responses" in p.read_text(errors="replace") for p in (ROOT / "proxy").glob("**/*.py")
)


@pytest.mark.skipif(
    not METRICS_IN_SOURCE, reason="proxy/ does not define faultline_* metrics yet (no /metrics)"
)
def test_served_metrics_are_the_ones_alerts_and_dashboard_query(served):
    proxy, admin, log = served
    assert _get(f"{proxy}/for-the-metrics")[0] == 200, _tail(log)
    status, _, text = _get(f"{admin}/metrics")
    assert status == 200, (status, _tail(log))
    samples: dict[str, set[str]] = {}
    histograms: set[str] = set()
    for line in text.decode().splitlines():
        if t := re.fullmatch(r"# TYPE ([a-zA-Z_:][\w:]*) histogram\s*", line):
            histograms.add(t.group(1))
        m = re.match(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s", line)
        if m and not line.startswith("#"):
            names = set(re.findall(r'(\w+)="', m.group(2) or ""))
            samples.setdefault(m.group(1), set()).update(names)
    assert {"code", "source", "layer", "error"} <= samples.get("faultline_responses_total", set())
    # The words come from expressions and from prose (descriptions, annotations), where a
    # histogram is named by its base name, which is a family, not a series: it counts as
    # exposed when /metrics declares it a histogram and serves its _bucket and _count
    # series. Every other name must be a series /metrics serves, exactly.
    exposed = set(samples) | {
        h for h in histograms if {f"{h}_bucket", f"{h}_count"} <= samples.keys()
    }
    queried = set(re.findall(r"faultline_\w+", ALERTS.read_text() + DASHBOARD.read_text()))
    missing = sorted(queried - exposed)
    assert not missing, f"alerts or dashboard query series /metrics does not expose: {missing}"


def _tail(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-3000:]


# ----------------------------------------------------------------------------- kustomize

CRD_GROUPS = ("monitoring.coreos.com/",)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> list[dict]:
    renderer = tool("kubectl", "kustomize")
    cmd = (
        [renderer, "kustomize", str(K8S)]
        if renderer.endswith("kubectl")
        else [renderer, "build", str(K8S)]
    )
    res = run(cmd)
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def test_kustomize_renders_the_base(rendered):
    kinds = sorted(d["kind"] for d in rendered)
    assert kinds == sorted(
        ["ConfigMap", "ConfigMap", "Deployment", "Service", "PodMonitor", "PrometheusRule"]
    ), kinds


def kubernetes_validate_latest(binary: str) -> str:
    """The newest Kubernetes version the installed kubernetes-validate knows: its CLI
    validates against it by default and names it in --help ("Defaults to X")."""
    m = re.search(r"Defaults to\s+(\d+\.\d+(?:\.\d+)?)", run([binary, "--help"]).stdout)
    if m:
        return m.group(1)
    from kubernetes_validate import utils  # the same answer from its library

    return utils.latest_version()


@pytest.mark.parametrize("version", ["1.29.0", "latest"])
def test_core_manifests_validate_strictly(rendered, version, tmp_path):
    validator = tool("kubernetes-validate")
    if version == "latest":
        version = kubernetes_validate_latest(validator)
        assert tuple(map(int, version.split(".")[:2])) >= (1, 29), version
    # kubernetes-validate ships the schemas of Kubernetes' built-in kinds only: for a
    # CRD kind (PodMonitor, PrometheusRule) it prints a WARN and passes. So the CRD
    # objects are deliberately left out here and checked structurally in
    # test_prometheus_operator_objects; every other object must pass --strict.
    core = [d for d in rendered if not d["apiVersion"].startswith(CRD_GROUPS)]
    manifest = tmp_path / "core.yaml"
    manifest.write_text(yaml.safe_dump_all(core))
    res = run([validator, "--strict", "-k", version, str(manifest)])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "WARN" not in res.stdout and "ERROR" not in res.stdout, res.stdout
    assert res.stdout.count(" passed for resource ") == len(core), res.stdout

    # Control: --strict really rejects an unknown field in this very Deployment.
    bad = json.loads(json.dumps(one(core, "Deployment")))
    bad["spec"]["template"]["spec"]["initContainers"][0]["notAField"] = True
    manifest.write_text(yaml.safe_dump(bad))
    res = run([validator, "--strict", "-k", version, str(manifest)])
    assert res.returncode != 0 and "notAField" in res.stdout, res.stdout


def container_port(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return p["containerPort"]
    raise AssertionError(f"container {container['name']} has no port named {port}")


def test_deployment_runs_faultline_as_a_native_sidecar(rendered):
    dep = one(rendered, "Deployment")
    pod = dep["spec"]["template"]
    spec = pod["spec"]
    sidecars = [c for c in spec.get("initContainers", []) if c.get("restartPolicy") == "Always"]
    assert [c["name"] for c in sidecars] == ["faultline"]
    fl = sidecars[0]
    assert fl["image"].split("/")[-1].startswith("faultline:")
    config = sidecar_config()
    proxy_port = int(config["listen"].rsplit(":", 1)[1])
    admin_port = int(config["admin"]["listen"].rsplit(":", 1)[1])
    assert config["admin"]["listen"].startswith("0.0.0.0:"), "probes and Prometheus need it"
    assert container_port(fl, "http") == proxy_port
    assert container_port(fl, "admin") == admin_port

    probes = {k: fl[k]["httpGet"] for k in ("livenessProbe", "readinessProbe", "startupProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["startupProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert container_port(fl, probe["port"]) == admin_port

    # The configuration is the generated ConfigMap, mounted where FAULTLINE_CONFIG points.
    mounts = {m["name"]: m for m in fl["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    cm_names = [volumes[n]["configMap"]["name"] for n in mounts if "configMap" in volumes[n]]
    cms = [d for d in rendered if d["kind"] == "ConfigMap" and d["metadata"]["name"] in cm_names]
    assert len(cms) == 1 and "faultline.yaml" in cms[0]["data"]
    assert yaml.safe_load(cms[0]["data"]["faultline.yaml"]) == config
    mount = next(m for m in mounts.values() if volumes[m["name"]].get("configMap"))
    assert mount["mountPath"] == "/etc/faultline" and mount.get("readOnly") is True

    # The upstream is the app container of the same pod, on loopback.
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", config["upstream"]), config["upstream"]
    app = one([{"kind": c["name"], **c} for c in spec["containers"]], "app")
    assert config["upstream"].removeprefix("http://") in " ".join(app["command"])

    # Scrape annotations point at the admin port.
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert ann["prometheus.io/port"] == str(admin_port)
    assert ann["prometheus.io/path"] == "/metrics"


def test_pod_security_and_resources(rendered):
    spec = one(rendered, "Deployment")["spec"]["template"]["spec"]
    pod_sc = spec.get("securityContext", {})
    assert pod_sc.get("runAsNonRoot") is True
    assert isinstance(pod_sc.get("runAsUser"), int) and pod_sc["runAsUser"] > 0
    assert spec.get("automountServiceAccountToken") is False
    for c in spec.get("initContainers", []) + spec["containers"]:
        sc = c.get("securityContext", {})
        effective = {**pod_sc, **sc}
        name = c["name"]
        assert effective.get("runAsNonRoot") is True, name
        assert isinstance(effective.get("runAsUser"), int) and effective["runAsUser"] > 0, name
        assert sc.get("readOnlyRootFilesystem") is True, name
        assert sc.get("allowPrivilegeEscalation") is False, name
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], name
        assert not sc.get("capabilities", {}).get("add"), name
        assert effective.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        res = c.get("resources", {})
        assert {"cpu", "memory"} <= set(res.get("requests", {})), name
        assert "memory" in res.get("limits", {}), name


def test_termination_grace_covers_shutdown_delay_and_drain(rendered):
    spec = one(rendered, "Deployment")["spec"]["template"]["spec"]
    t = sidecar_config()["timeouts"]
    assert seconds(t["shutdown_delay"]) == 5 and seconds(t["drain"]) == 20
    # The kubelet stops the app container first (after its preStop), the sidecar last:
    # the grace period must hold both, with margin.
    pre_stop = 0.0
    for c in spec["containers"]:
        cmd = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        if cmd[:1] == ["sleep"]:
            pre_stop = max(pre_stop, float(cmd[1]))
    needed = pre_stop + seconds(t["shutdown_delay"]) + seconds(t["drain"])
    grace = spec["terminationGracePeriodSeconds"]
    assert grace >= needed + 10, f"terminationGracePeriodSeconds {grace} < {needed} + 10s margin"


def test_service_targets_the_sidecar_not_the_app(rendered):
    svc = one(rendered, "Service")
    pod = one(rendered, "Deployment")["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    fl = pod["spec"]["initContainers"][0]
    for port in svc["spec"]["ports"]:
        # A number: named ports of native sidecars resolve only from Kubernetes 1.32 on.
        assert isinstance(port["targetPort"], int), port
        assert port["targetPort"] == container_port(fl, "http"), port


def test_sidecar_config_uses_only_contract_keys():
    def walk(node: dict, allowed: dict, path: str):
        for key, value in node.items():
            assert key in allowed, f"unknown configuration key {path}{key}"
            if isinstance(value, dict):
                assert isinstance(allowed[key], dict), f"{path}{key} is not a section"
                walk(value, allowed[key], f"{path}{key}.")

    config = sidecar_config()
    walk(config, CONFIG_KEYS, "")
    for key in (
        "connect",
        "response_headers",
        "upstream_read",
        "client_headers",
        "client_body",
        "keepalive",
        "drain",
        "shutdown_delay",
    ):
        seconds(config["timeouts"][key])


# ----------------------------------------------------------------------------- Prometheus


def alert_groups() -> list[dict]:
    return yaml.safe_load(ALERTS.read_text())["groups"]


def alert_rules() -> dict[str, dict]:
    return {r["alert"]: r for g in alert_groups() for r in g["rules"] if "alert" in r}


def test_prometheus_operator_objects(rendered):
    """PodMonitor and PrometheusRule are CRDs, outside kubernetes-validate's schemas:
    checked here for the fields the Prometheus Operator needs and for their links to
    the Deployment and to the plain rules file."""
    pod = one(rendered, "Deployment")["spec"]["template"]
    labels = pod["metadata"]["labels"]
    fl = pod["spec"]["initContainers"][0]

    pm = one(rendered, "PodMonitor")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1" and pm["metadata"]["name"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "app.kubernetes.io/name" in pm["spec"].get("podTargetLabels", [])
    endpoints = pm["spec"]["podMetricsEndpoints"]
    assert endpoints
    for ep in endpoints:
        assert container_port(fl, ep["port"]) == container_port(fl, "admin")
        assert ep.get("path", "/metrics") == "/metrics"

    pr = one(rendered, "PrometheusRule")
    assert pr["apiVersion"] == "monitoring.coreos.com/v1" and pr["metadata"]["name"]
    assert set(pr["spec"]) == {"groups"}
    assert pr["spec"]["groups"] == alert_groups(), (
        "k8s/prometheusrule.yaml and k8s/alerts/faultline-alerts.rules.yaml differ: "
        "their rule groups must be identical"
    )


def test_alerts_cover_the_faults_with_advice():
    rules = alert_rules()
    assert set(rules) == {
        "FaultlineProxy5xxRate",
        "FaultlineOrigin5xxRate",
        "FaultlineUpstreamConnectFailures",
        "FaultlineUpstreamTimeouts",
    }

    def tokens(expr: str) -> set[str]:
        found = re.findall(r'error=~"([^"]+)"', expr)
        assert found
        return {t for f in found for t in f.split("|")}

    assert tokens(rules["FaultlineUpstreamConnectFailures"]["expr"]) == CONNECT_FAILURES
    assert tokens(rules["FaultlineUpstreamTimeouts"]["expr"]) == UPSTREAM_TIMEOUTS
    assert 'source="proxy"' in rules["FaultlineProxy5xxRate"]["expr"]
    assert 'source="origin"' in rules["FaultlineOrigin5xxRate"]["expr"]
    for name, rule in rules.items():
        assert seconds(rule["for"]) >= 120, f"{name}: alert on sustained rates"
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        ann = rule["annotations"]
        for key in ("summary", "description", "layer", "check_first"):
            assert ann.get(key, "").strip(), f"{name}: annotation {key}"


def test_promtool_check_rules(rendered, tmp_path):
    promtool = tool("promtool")
    res = run([promtool, "check", "rules", str(ALERTS)])
    assert res.returncode == 0, res.stdout + res.stderr
    # The PrometheusRule as rendered by kustomize, too.
    spec = tmp_path / "prometheusrule-spec.yaml"
    spec.write_text(yaml.safe_dump(one(rendered, "PrometheusRule")["spec"]))
    res = run([promtool, "check", "rules", str(spec)])
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_unit_tests_fire_and_stay_silent():
    promtool = tool("promtool")
    tests = sorted((K8S / "alerts").glob("*test*.yaml"))
    assert tests, "no promtool unit tests in k8s/alerts/"
    # Every alert is tested both ways: firing on a fault, silent on healthy series.
    fired, silent = set(), set()
    for path in tests:
        for group in yaml.safe_load(path.read_text())["tests"]:
            for case in group.get("alert_rule_test", []):
                (fired if case.get("exp_alerts") else silent).add(case["alertname"])
    assert fired == set(alert_rules()) and silent == set(alert_rules()), (fired, silent)
    res = run([promtool, "test", "rules", *map(str, tests)], cwd=K8S / "alerts")
    assert res.returncode == 0, res.stdout + res.stderr


# ----------------------------------------------------------------------------- Grafana

GRAFANA_INTERVALS = re.compile(r"\$\{?__(?:rate_interval|interval|range)\}?")
GRAFANA_VARIABLES = re.compile(r"\$\{([A-Za-z_]\w*)(?::[^}]*)?\}|\$([A-Za-z_]\w*)|\[\[(\w+)\]\]")


def grafana_to_promql(expr: str) -> str:
    """Substitute Grafana's variables: intervals by a duration, template variables (used
    in label matchers) by a regex. `${1}` (a label_replace group) is left alone."""
    expr = GRAFANA_INTERVALS.sub("5m", expr)
    return GRAFANA_VARIABLES.sub(".*", expr)


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = []

    def panels(items):
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dash["panels"]):
        for t in p.get("targets", []):
            exprs.append((f"panel {p['id']} ({p['title']}) {t['refId']}", t["expr"]))
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", q)
            if m:  # label_values(<series selector>, label): the selector is PromQL
                exprs.append((f"variable {var['name']}", m.group(1)))
    return exprs


def test_dashboard_covers_the_metrics():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["panels"]
    text = " ".join(e for _, e in dashboard_exprs())
    for metric in (
        "faultline_responses_total",
        "faultline_request_duration_seconds_bucket",
        "faultline_upstream_phase_seconds_bucket",
        "faultline_in_flight_requests",
        "faultline_upstream_pool_connections",
        "faultline_build_info",
    ):
        assert metric in text, f"the dashboard does not show {metric}"
    for split in (
        "by (source)",
        "by (error, layer)",
        "by (le, source)",
        "by (le, phase)",
        "by (state)",
    ):
        assert split in text, f"the dashboard has no panel split {split}"


def test_dashboard_promql_parses(tmp_path):
    promtool = tool("promtool")
    exprs = dashboard_exprs()
    rules = [
        {"record": f"dashboard:expr_{i}:check", "expr": grafana_to_promql(e)}
        for i, (_, e) in enumerate(exprs)
    ]
    path = tmp_path / "dashboard-exprs.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = run([promtool, "check", "rules", str(path)])
    if res.returncode != 0:  # name the panel whose expression does not parse
        bad = []
        for (where, e), rule in zip(exprs, rules, strict=True):
            one_rule = tmp_path / "one.rules.yaml"
            one_rule.write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": [rule]}]}))
            r = run([promtool, "check", "rules", str(one_rule)])
            if r.returncode:
                bad.append(f"{where}: {e}\n  {r.stdout.strip()} {r.stderr.strip()}")
        pytest.fail("dashboard expressions that do not parse:\n" + "\n".join(bad))
    assert f"SUCCESS: {len(rules)} rules found" in res.stdout, res.stdout
