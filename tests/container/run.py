#!/usr/bin/env python3
"""Container test stage: build the image from the unmodified Dockerfile and run it for real.

Run from anywhere, as root, on a Debian machine with rootful podman (no Docker engine and no
registry needed):

    python3 tests/container/run.py            # or: bash tests/container/run
    python3 tests/container/run.py --help     # flags: another Dockerfile, extra sidecar env, ...

What it does, in order:

 1. Tools. podman, runc, catatonit (podman's pod infra), netavark and iptables (the pod
    network, its published ports) and debootstrap; missing ones are apt-get installed.
    If podman cannot run at all (missing and not installable, or `podman info` fails) the
    stage is SKIPPED (exit 0). Every other problem is a failure (exit 1).
 2. podman configuration in a private work dir (CONTAINERS_CONF; the user's global
    configuration is not read): runtime runc (crun refuses hybrid cgroups), nofile/nproc ulimits.
 3. A stand-in for the Dockerfile's FROM image (its `ARG PYTHON_IMAGE` default, e.g.
    python:3.12-slim-bookworm): a Debian minbase made with debootstrap with python3, venv,
    pip, the Python headers and ca-certificates, python/pip linked into /usr/local/bin, the
    host's locally added CA certificates and pip settings, apt sources from the host's mirror.
    Imported with `podman import` and tagged with the FROM name. An image of that name that
    already exists is reused (the cache between runs); --rebuild-base makes it anew.
 4. `podman build --format docker --network=host` of the Dockerfile as it is (docker format
    keeps the HEALTHCHECK) into faultline:ci.
 5. A pod wired as k8s/deployment.yaml wires its example app: an app container on
    127.0.0.1:3000 and the Faultline container (read-only root fs, no tmpfs, the image's own
    USER, capabilities dropped, no-new-privileges, 256 MiB) configured by k8s/faultline.yaml
    mounted read-only at /etc/faultline (the ConfigMap), with a short shutdown_delay and drain
    as environment twins. The pod's 8080 and 9901 are published on 127.0.0.1 free ports only.
 6. Checks, one PASS/FAIL line each: non-root (uid 10001), read-only root fs, /healthz and
    /readyz, a proxied GET (200, the app's body, Proxy-Status received-status=200 with the
    ConfigMap's proxy name, Server-Timing), a proxy-made 502 connection_refused with the app
    stopped, the image's HEALTHCHECK, and SIGTERM: readyz 503 and still serving during
    shutdown_delay, an in-flight request finished, exit 0 within the drain time, the log
    says it drained; the start-up line says the compiled build runs with the ConfigMap's
    upstream. Then the image size and the times.

Every container and pod it makes carries this run's unique name and is removed on the way
out, pass or fail. Images (the stand-in base, faultline:ci, build layers) are kept as the
cache unless --remove-images is given.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
IMAGE = "faultline:ci"
APP_PORT = 3000  # k8s/faultline.yaml's upstream: http://127.0.0.1:3000
PROXY_PORT = 8080  # the image's and the manifests' listen port
ADMIN_PORT = 9901  # the image's default admin listen: 0.0.0.0:9901
EXPECTED_UID = "10001"  # the Dockerfile's USER, and the manifests' runAsUser
STANDIN_LABEL = "org.faultline.ci.standin"
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")  # what update-ca-certificates adds
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
DEBIAN_SUITES = ("bookworm", "trixie", "bullseye")
STANDIN_PACKAGES = "python3,python3-venv,python3-pip,python3-dev,ca-certificates"
# The sidecar's short shutdown: the test waits through both. Override with --sidecar-env.
SIDECAR_ENV = {"FAULTLINE_TIMEOUTS_SHUTDOWN_DELAY": "2s", "FAULTLINE_TIMEOUTS_DRAIN": "4s"}

# The app container: a tiny stdlib origin on loopback, as the manifests' busybox httpd.
# GET /anything -> 200 with the body given as argv[1]; GET /slow?s=N answers after N s.
APP_SERVER = r"""
import http.server, signal, sys, time, urllib.parse
BODY = sys.argv[1].encode()
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/slow":
            time.sleep(float(urllib.parse.parse_qs(url.query).get("s", ["2"])[0]))
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # PID 1 gets no default handler
http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
""".replace("PORT", str(APP_PORT))


class Skip(Exception):
    """podman cannot run here at all: the stage is skipped."""


class StageError(Exception):
    """A step the checks depend on failed: the stage fails."""


def say(msg: str) -> None:
    print(msg, flush=True)


PHASE = ["start"]  # the step under way, named in a failure that stops the stage


def step(title: str) -> None:
    PHASE[0] = title.split()[0]
    say(f"::: container: {title}")


def run(
    cmd: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 120,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output as text; on failure with check, raise StageError."""
    try:
        proc = subprocess.run(
            list(cmd), capture_output=True, text=True, errors="replace", timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired as exc:
        raise StageError(f"timed out after {timeout:.0f}s: {shlex.join(cmd)}") from exc
    if check and proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise StageError(f"exit {proc.returncode}: {shlex.join(cmd)}\n{tail}")
    return proc


def podman(
    *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return run(["podman", *args], check=check, timeout=timeout)


def seconds(value: str) -> float:
    """A Faultline duration (250ms, 5s, 2m, or a number of seconds) in seconds."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(ms|s|m)?\s*", value)
    if not m:
        raise StageError(f"cannot read the duration {value!r}")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[m.group(2)]


# --------------------------------------------------------------------------- results


class Results:
    def __init__(self) -> None:
        self.passed = 0
        self.failed: list[str] = []

    def check(self, name: str, ok: bool, reason: str) -> bool:
        say(f"{'PASS' if ok else 'FAIL'}  {name}: {reason}")
        if ok:
            self.passed += 1
        else:
            self.failed.append(name)
        return ok


# --------------------------------------------------------------------------- 1. tools


def apt_install(packages: list[str]) -> bool:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    say(f"apt-get install {' '.join(packages)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
    ):
        if run(cmd, check=False, timeout=600, env=env).returncode != 0:
            return False
    return True


def ensure_tools() -> None:
    if os.geteuid() != 0:
        raise StageError(
            "must run as root: the stage uses rootful podman, debootstrap and chroot "
            "(sudo python3 tests/container/run.py)"
        )
    # runc: the runtime (crun refuses hybrid cgroups); catatonit: podman builds its pod infra
    # ("pause") image from it; netavark: the pod network, which publishes the pod's ports
    # with iptables; debootstrap: the stand-in base. Each tool is its Debian package's name.
    helpers = ["runc", "catatonit", "netavark", "iptables", "debootstrap"]
    if shutil.which("podman") is None:
        apt_install(["podman", *helpers])
        if shutil.which("podman") is None:
            raise Skip("podman is not installed and could not be installed with apt-get")
    missing = [tool for tool in helpers if not on_path(tool)]
    if missing and not apt_install(missing):
        raise StageError(f"missing and not installable with apt-get: {' '.join(missing)}")
    still = [tool for tool in helpers if not on_path(tool)]
    if still:
        raise StageError(f"still missing after apt-get install: {' '.join(still)}")


def on_path(tool: str) -> bool:
    extra = ["/usr/sbin", "/sbin", "/usr/libexec/podman", "/usr/lib/podman"]
    return shutil.which(tool) is not None or any(Path(d, tool).exists() for d in extra)


def configure_podman(work: Path) -> None:
    """A containers.conf of our own: the user's global configuration stays untouched."""
    conf = work / "containers.conf"
    conf.write_text(
        "# Written by tests/container/run.py for this run only.\n"
        "[containers]\n"
        "# podman's default nofile (1048576) is refused here: runc create fails with\n"
        "# 'error setting rlimit type 7: operation not permitted'.\n"
        'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
        "\n"
        "[engine]\n"
        "# crun refuses the hybrid cgroup layout of this machine kind.\n"
        'runtime = "runc"\n'
    )
    os.environ["CONTAINERS_CONF"] = str(conf)
    info = podman("info", "--format", "json", check=False, timeout=60)
    if info.returncode != 0:
        raise Skip(f"`podman info` fails, podman cannot run here:\n{info.stderr.strip()[-1500:]}")
    data = json.loads(info.stdout)
    host = data.get("host", {})
    say(
        f"podman {data.get('version', {}).get('Version', '?')}, runtime "
        f"{host.get('ociRuntime', {}).get('name', '?')}, cgroups {host.get('cgroupVersion', '?')}, "
        f"network {host.get('networkBackend', '?')}, CONTAINERS_CONF={conf}"
    )


# --------------------------------------------------------------------------- 2. stand-in base


def from_image(dockerfile: Path) -> str:
    """The default of the Dockerfile's `ARG PYTHON_IMAGE` (what its FROM lines use)."""
    m = re.search(r"^\s*ARG\s+PYTHON_IMAGE=(\S+)", dockerfile.read_text(), re.MULTILINE)
    if not m:
        raise StageError(f"{dockerfile}: no `ARG PYTHON_IMAGE=...` default to make a stand-in for")
    return m.group(1)


def qualified(name: str) -> str:
    """What a Docker engine resolves a short name to (python:3.12 -> docker.io/library/...)."""
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return name
    return f"docker.io/{name if rest else 'library/' + name}"


def debian_suite(image: str) -> str:
    tag = image.rpartition(":")[2]
    for suite in DEBIAN_SUITES:
        if tag.endswith(suite):
            return suite
    return "bookworm"


def host_apt_mirrors() -> tuple[str, str]:
    """The Debian archive and security mirrors the host's apt sources use."""
    archive = security = ""
    texts = []
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if path.suffix in (".list", ".sources") and path.is_file():
            texts.append((path.suffix, path.read_text(errors="replace")))
    entries: list[tuple[list[str], list[str]]] = []  # (uris, suites)
    for suffix, text in texts:
        if suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(
                    (k.strip().lower(), v.strip())
                    for k, _, v in (ln.partition(":") for ln in stanza.splitlines())
                    if not k.startswith("#") and v
                )
                if "deb" in fields.get("types", "").split():
                    entries.append(
                        (fields.get("uris", "").split(), fields.get("suites", "").split())
                    )
        else:
            for line in text.splitlines():
                parts = re.sub(r"\[[^]]*\]", "", line.split("#")[0]).split()
                if len(parts) >= 3 and parts[0] == "deb":
                    entries.append(([parts[1]], [parts[2]]))
    for uris, suites in entries:
        for uri in uris:
            if not uri.startswith(("http://", "https://")):
                continue
            if any(s.endswith("-security") for s in suites):
                security = security or uri
            elif any(s.split("-")[0] in DEBIAN_SUITES for s in suites):
                archive = archive or uri
    return (
        archive.rstrip("/") or "http://deb.debian.org/debian",
        security.rstrip("/") or "http://deb.debian.org/debian-security",
    )


def host_pip_settings() -> tuple[dict[str, list[str]], list[str]]:
    """The host pip's settings that carry over into a container: network ones only."""
    proc = run([sys.executable, "-m", "pip", "config", "list"], check=False, timeout=60)
    if proc.returncode != 0 and shutil.which("pip3"):
        proc = run(["pip3", "config", "list"], check=False, timeout=60)
    listed = proc.stdout.splitlines() if proc.returncode == 0 else pip_settings_without_pip()
    keep: dict[str, list[str]] = {}
    notes: list[str] = []
    for line in listed:
        key, _, value = line.partition("=")
        option = key.rpartition(".")[2]
        values = value.strip().strip("'\"").split()
        if option in ("index-url", "extra-index-url", "trusted-host", "proxy"):
            for v in values:
                if option == "trusted-host" or v.startswith(("http://", "https://")):
                    if v not in keep.setdefault(option, []):
                        keep[option].append(v)
                else:
                    notes.append(f"{option} {v}: left out (a local path, not in the image)")
        elif option in ("default-timeout", "timeout", "retries"):
            keep[option] = values[-1:]
        elif option == "cert":
            notes.append(f"cert {values[0]}: the stand-in's system bundle, host CAs added")
        elif option in ("find-links", "constraint"):
            notes.append(f"{option} {' '.join(values)}: left out (local files, not in the image)")
    return keep, list(dict.fromkeys(notes))


def pip_settings_without_pip() -> list[str]:
    """`pip config list`'s lines when no pip runs here: the config files' [global] sections
    and the PIP_* environment (later ones win, as in pip)."""
    import configparser

    files = ["/etc/xdg/pip/pip.conf", "/etc/pip.conf", "~/.pip/pip.conf", "~/.config/pip/pip.conf"]
    files.append(os.environ.get("PIP_CONFIG_FILE", ""))
    lines = []
    for name in filter(None, files):
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read(os.path.expanduser(name))
        except configparser.Error:
            continue
        if parser.has_section("global"):
            lines += [f"global.{k}='{v}'" for k, v in parser.items("global")]
    for var, value in os.environ.items():
        if var.startswith("PIP_"):
            lines.append(f":env:.{var[4:].lower().replace('_', '-')}='{value}'")
    return lines


def umount_under(root: Path) -> None:
    """debootstrap mounts /proc and /sys inside its target: never rm -rf through a mount."""
    mounts = [
        line.split()[1].replace("\\040", " ")
        for line in Path("/proc/mounts").read_text().splitlines()
    ]
    for mnt in sorted((m for m in mounts if m.startswith(str(root) + "/")), reverse=True):
        run(["umount", "-l", mnt], check=False)


def remove_tree(root: Path) -> None:
    if root.exists():
        umount_under(root)
        if any(
            line.split()[1].startswith(str(root) + "/")
            for line in Path("/proc/mounts").read_text().splitlines()
        ):
            raise StageError(f"{root}: still has mounts under it, not removing it")
        shutil.rmtree(root)


def make_standin(name: str, work: Path, rebuild: bool) -> float:
    """The FROM image's stand-in, tagged with its fully qualified name. Returns seconds spent."""
    t0 = time.monotonic()
    tagged = qualified(name)
    if podman("image", "exists", tagged, check=False).returncode == 0:
        if not rebuild:
            label = podman(
                "image", "inspect", "--format", f'{{{{index .Labels "{STANDIN_LABEL}"}}}}', tagged
            ).stdout.strip()
            what = (
                f"the stand-in made {label}"
                if label and label != "<no value>"
                else "NOT a stand-in made by this script: used as it is"
            )
            say(f"reusing the existing image {tagged} ({what}); --rebuild-base makes it anew")
            return 0.0
        podman("rmi", "-f", tagged, check=False)

    suite = debian_suite(name)
    archive, security = host_apt_mirrors()
    root = work / "standin-root"
    say(f"debootstrap --variant=minbase {suite} from {archive} (about a minute) ...")
    proc = run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={STANDIN_PACKAGES}",
            suite,
            str(root),
            archive,
        ],
        check=False,
        timeout=900,
    )
    if proc.returncode != 0:
        log = root / "debootstrap" / "debootstrap.log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else proc.stderr[-2000:]
        remove_tree(root)
        raise StageError(f"debootstrap failed (exit {proc.returncode}):\n{tail}")
    umount_under(root)

    # python/pip where the python.org images have them; that image has no EXTERNALLY-MANAGED.
    for link, target in (("python", "/usr/bin/python3"), ("pip", "/usr/bin/pip3")):
        (root / "usr/local/bin" / link).symlink_to(target)
    for marker in root.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
        marker.unlink()

    # The host's locally added CAs (this host reaches the package indexes through a proxy
    # with its own CA): pip and apt in the build must trust what the host trusts.
    added = []
    if HOST_CA_DIR.is_dir():
        dest = root / HOST_CA_DIR.relative_to("/")
        shutil.copytree(HOST_CA_DIR, dest, dirs_exist_ok=True)
        added = sorted(p.name for p in HOST_CA_DIR.rglob("*.crt"))
    run(["chroot", str(root), "update-ca-certificates"], timeout=120)
    say(f"host CA certificates added: {', '.join(added) or 'none'}")

    # pip: the host's network settings (index, proxy, timeout), the system CA bundle.
    settings, notes = host_pip_settings()
    lines = ["[global]", "cert = /etc/ssl/certs/ca-certificates.crt"]
    lines += [f"{k} = {' '.join(v)}" for k, v in settings.items()]
    (root / "etc/pip.conf").write_text("\n".join(lines) + "\n")
    index = settings.get("index-url", ["https://pypi.org/simple (direct)"])[0]
    say(f"stand-in pip: index {index}; /etc/pip.conf: {'; '.join(lines[1:])}")
    for note in notes:
        say(f"  host pip {note}")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        if os.environ.get(var):
            say(f"  {var} is set: podman build passes it to RUN steps (--http-proxy)")

    # apt: the host's mirrors, with the suites a Debian image has.
    (root / "etc/apt/sources.list").unlink(missing_ok=True)
    (root / "etc/apt/sources.list.d/debian.sources").write_text(
        f"Types: deb\nURIs: {archive}\nSuites: {suite} {suite}-updates\nComponents: main\n"
        f"Signed-By: {DEBIAN_KEYRING}\n\n"
        f"Types: deb\nURIs: {security}\nSuites: {suite}-security\nComponents: main\n"
        f"Signed-By: {DEBIAN_KEYRING}\n"
    )
    proxies = run(["apt-config", "dump"], check=False).stdout if shutil.which("apt-config") else ""
    proxy_re = re.compile(r"Acquire::https?::Proxy", re.I)
    proxy_lines = [ln for ln in proxies.splitlines() if proxy_re.match(ln)]
    if proxy_lines:
        (root / "etc/apt/apt.conf.d/80host-proxy").write_text("\n".join(proxy_lines) + "\n")
        say(f"  host apt proxy settings copied: {len(proxy_lines)} line(s)")

    # As a Debian image: no package lists, no host identity.
    for sub in ("var/lib/apt/lists", "var/cache/apt/archives"):
        for p in (root / sub).glob("*"):
            if p.is_file():
                p.unlink()
    for f in ("etc/resolv.conf", "etc/hostname"):
        (root / f).unlink(missing_ok=True)

    made = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    changes = [
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "ENV LANG=C.UTF-8",
        f"LABEL {STANDIN_LABEL}={made}",
        'CMD ["python3"]',
    ]
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    args = ["podman", "import"]
    for change in changes:
        args += ["--change", change]
    imp = subprocess.run([*args, "-", tagged], stdin=tar.stdout, capture_output=True, text=True)
    tar.wait()
    remove_tree(root)
    if tar.returncode != 0 or imp.returncode != 0:
        raise StageError(f"podman import failed: {imp.stderr.strip()[-1500:]}")
    spent = time.monotonic() - t0
    say(f"stand-in {tagged} made in {spent:.0f}s")
    return spent


# --------------------------------------------------------------------------- 3. build


def build(dockerfile: Path, work: Path, times: dict[str, float]) -> None:
    log_path = work / "build.log"
    cmd = [
        "podman", "build", "--format", "docker", "--network=host",
        "--pull=never",  # the FROM image is the local stand-in: never reach for a registry
        "-f", str(dockerfile), "-t", IMAGE, ".",
    ]  # fmt: skip
    say(f"$ {shlex.join(cmd)}   (in {REPO})")
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if re.match(r"(\[\d+/\d+\] )?STEP \d+/\d+: ", line):
                say(f"  [{time.monotonic() - t0:5.1f}s] {line.rstrip()[:150]}")
        rc = proc.wait()
    spent = times["build"] = time.monotonic() - t0
    text = log_path.read_text(errors="replace")
    if rc != 0:
        tail = "\n".join(text.splitlines()[-40:])
        raise StageError(f"podman build failed (exit {rc}) after {spent:.0f}s; log tail:\n{tail}")
    cached = text.count("Using cache")
    say(f"build time: {spent:.1f}s" + (f" ({cached} steps from the layer cache)" if cached else ""))


# --------------------------------------------------------------------------- 4. the pod


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Reply:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def header(self, name: str) -> str:
        return ", ".join(self.headers.get_all(name) or [])


def get(port: int, path: str, timeout: float = 5) -> Reply:
    """One GET on a new connection (http.client: no proxy from the environment, no raising)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Accept": "*/*"})
        resp = conn.getresponse()
        return Reply(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def wait_for(
    what: str, probe: Callable[[], bool], timeout: float, container: str | None = None
) -> None:
    """Poll probe() until it returns True; fail early if the container exits."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            if probe():
                return
        except OSError as exc:
            last = str(exc)
        if container:
            state = podman("inspect", "--format", "{{.State.Status}}", container, check=False)
            if state.stdout.strip() in ("exited", "stopped"):
                logs = podman("logs", container, check=False)
                raise StageError(
                    f"{container} exited while waiting for {what}:\n"
                    f"{(logs.stdout + logs.stderr)[-2000:]}"
                )
        time.sleep(0.2)
    raise StageError(f"{what}: not within {timeout:.0f}s ({last or 'no answer'})")


class Pod:
    def __init__(self, run_id: str, work: Path, base: str, sidecar_env: dict[str, str]) -> None:
        self.pod = f"{run_id}-pod"
        self.app = f"{run_id}-app"
        self.proxy = f"{run_id}-faultline"
        self.base = base
        self.body = f"hello from the app of {run_id}\n"
        self.env = sidecar_env
        self.http_port = free_port()
        self.admin_port = free_port()
        while self.admin_port == self.http_port:
            self.admin_port = free_port()
        # The ConfigMap: k8s/faultline.yaml as the file /etc/faultline/faultline.yaml.
        self.config_dir = work / "configmap"
        self.config_dir.mkdir(mode=0o755)
        self.config_dir.chmod(0o755)
        shutil.copy(REPO / "k8s/faultline.yaml", self.config_dir / "faultline.yaml")
        (self.config_dir / "faultline.yaml").chmod(0o644)
        cm = (self.config_dir / "faultline.yaml").read_text()
        m = re.search(r"^proxy_name:\s*(\S+)", cm, re.M)
        self.proxy_name = m.group(1) if m else "faultline"

    def start(self) -> None:
        podman(
            "pod", "create", "--name", self.pod,
            "-p", f"127.0.0.1:{self.http_port}:{PROXY_PORT}",
            "-p", f"127.0.0.1:{self.admin_port}:{ADMIN_PORT}",
        )  # fmt: skip
        env_args = [a for k, v in self.env.items() for a in ("-e", f"{k}={v}")]
        # The sidecar first, as Kubernetes starts a native sidecar before the app.
        podman(
            "run", "-d", "--name", self.proxy, "--pod", self.pod,
            "--read-only", "--read-only-tmpfs=false",  # readOnlyRootFilesystem, no tmpfs either
            "--cap-drop=ALL", "--security-opt=no-new-privileges",  # the manifests' securityContext
            "--memory=256m",  # the manifests' memory limit
            "-v", f"{self.config_dir}:/etc/faultline:ro",
            *env_args,
            IMAGE,
        )  # fmt: skip
        podman(
            "run", "-d", "--name", self.app, "--pod", self.pod,
            "--user", "10001:10001", "--read-only", "--cap-drop=ALL",
            self.base, "python3", "-c", APP_SERVER, self.body,
        )  # fmt: skip
        say(
            f"pod {self.pod}: proxy 127.0.0.1:{self.http_port} -> :{PROXY_PORT}, "
            f"admin 127.0.0.1:{self.admin_port} -> :{ADMIN_PORT}, app 127.0.0.1:{APP_PORT} inside"
        )
        admin, proxied = self.admin_port, self.http_port
        wait_for("/healthz", lambda: get(admin, "/healthz").status == 200, 30, self.proxy)
        wait_for("the app through the proxy", lambda: get(proxied, "/").status == 200, 30, self.app)

    def logs(self, container: str, lines: int = 20) -> str:
        """The container's last lines, stdout's then stderr's (podman 4.3's --tail drops
        stderr lines, so the tail is cut here)."""
        proc = podman("logs", container, check=False)
        out, err = proc.stdout.splitlines(), proc.stderr.splitlines()
        return "\n".join(out[-lines:] + err[-lines:])

    def remove(self) -> None:
        for name in (self.proxy, self.app):
            podman("rm", "-f", "-t", "0", name, check=False)
        podman("pod", "rm", "-f", self.pod, check=False)


# --------------------------------------------------------------------------- 5. the checks


def check_image(r: Results) -> None:
    info = json.loads(podman("image", "inspect", IMAGE).stdout)[0]
    config = info.get("Config") or {}
    hc = info.get("Healthcheck") or config.get("Healthcheck") or {}
    r.check(
        "image HEALTHCHECK kept (docker format)",
        "127.0.0.1:9901/healthz" in " ".join(hc.get("Test") or []),
        describe_healthcheck(hc),
    )
    r.check("image USER", config.get("User") == "10001:10001", f"User={config.get('User')!r}")


def check_banner(r: Results, pod: Pod) -> None:
    """The start-up line: the compiled build (as the Dockerfile builds it), the upstream."""
    lines = [ln for ln in pod.logs(pod.proxy, 200).splitlines() if ln.startswith("faultline ")]
    banner = lines[0].strip() if lines else ""
    r.check(
        "compiled build, configured by the ConfigMap",
        "(compiled)" in banner and "-> http://127.0.0.1:3000" in banner,
        banner or "no start-up line in `podman logs`",
    )


def check_non_root(r: Results, pod: Pod) -> None:
    uid = podman("exec", pod.proxy, "id", "-u", check=False)
    r.check(
        "non-root: exec id -u",
        uid.returncode == 0 and uid.stdout.strip() == EXPECTED_UID,
        f"`podman exec {pod.proxy} id -u` -> {uid.stdout.strip() or uid.stderr.strip()!r}",
    )
    status = podman("exec", pod.proxy, "cat", "/proc/1/status", check=False).stdout
    fields = (ln.partition(":\t") for ln in status.splitlines())
    ids = {k: v.split() for k, _, v in fields if k in ("Name", "Uid", "Gid")}
    top = podman("top", pod.proxy, "pid", "huser", "comm", check=False).stdout.split("\n")
    main_line = " ".join(top[1].split()) if len(top) > 1 else "?"
    uids = ids.get("Uid", [])
    r.check(
        "non-root: main process",
        bool(uids) and all(u == EXPECTED_UID for u in uids) and "0" not in uids,
        f"PID 1 {ids.get('Name', ['?'])[0]}: Uid {' '.join(uids)} "
        f"Gid {' '.join(ids.get('Gid', []))}; "
        f"podman top: {main_line}",
    )
    user = podman("inspect", "--format", "{{.Config.User}}", pod.proxy).stdout.strip()
    r.check("non-root: the image's USER kept", user == "10001:10001", f"Config.User={user!r}")


def check_read_only(r: Results, pod: Pod) -> None:
    ro = podman("inspect", "--format", "{{.HostConfig.ReadonlyRootfs}}", pod.proxy).stdout.strip()
    r.check("read-only root fs: inspect", ro == "true", f"HostConfig.ReadonlyRootfs={ro}")
    outcomes = []
    ok = True
    attempts = [
        ([], "/opt/faultline/x"),  # as the image's user
        (["--user", "0"], "/x"),  # even root: EROFS, not a permission problem
        (["--user", "0"], "/opt/faultline/x"),
        (["--user", "0"], "/tmp/x"),  # --read-only-tmpfs=false: no writable /tmp either
    ]
    for user, path in attempts:
        proc = podman("exec", *user, pod.proxy, "touch", path, check=False)
        who = "root" if user else "the image's user"
        msg = proc.stderr.strip().rpartition(": ")[2] or "(no error)"
        outcomes.append(f"{who} touch {path}: {msg}")
        ok &= proc.returncode != 0 and (not user or "Read-only file system" in proc.stderr)
    r.check("read-only root fs: writes fail", ok, "; ".join(outcomes))


def check_probes(r: Results, pod: Pod) -> None:
    for path in ("/healthz", "/readyz"):
        rep = get(pod.admin_port, path)
        r.check(f"admin {path}", rep.status == 200, f"{rep.status} {rep.body[:60]!r}")


def check_proxied(r: Results, pod: Pod) -> None:
    rep = get(pod.http_port, "/")
    ps, st = rep.header("Proxy-Status"), rep.header("Server-Timing")
    ok = (
        rep.status == 200
        and rep.body.decode(errors="replace") == pod.body
        and "received-status=200" in ps
        and ps.split(";")[0].strip() == pod.proxy_name
        and bool(st)
    )
    r.check(
        "proxied GET",
        ok,
        f"{rep.status}, body {rep.body[:40]!r}, Proxy-Status: {ps or '(none)'}, "
        f"Server-Timing: {st or '(none)'}",
    )


def check_app_down(r: Results, pod: Pod) -> None:
    podman("stop", "-t", "5", pod.app)
    rep = get(pod.http_port, "/")
    ps = rep.header("Proxy-Status")
    r.check(
        "app stopped: proxy-made 502",
        rep.status == 502 and "error=connection_refused" in ps,
        f"{rep.status} {rep.header('Content-Type')}, Proxy-Status: {ps or '(none)'}",
    )
    podman("start", pod.app)
    try:
        wait_for("the app back", lambda: get(pod.http_port, "/").status == 200, 20, pod.app)
        r.check("app started again: 200", True, "the proxy reaches the restarted app")
    except StageError as exc:
        r.check("app started again: 200", False, str(exc))


def check_healthcheck(r: Results, pod: Pod) -> None:
    proc = podman("healthcheck", "run", pod.proxy, check=False, timeout=30)
    said = (proc.stdout + proc.stderr).strip() or "healthy"
    r.check("HEALTHCHECK: healthcheck run", proc.returncode == 0, f"exit {proc.returncode}: {said}")
    shown = podman("inspect", "--format", "{{json .Config.Healthcheck}}", pod.proxy).stdout
    hc = json.loads(shown or "null") or {}
    r.check(
        "HEALTHCHECK: container config from the image",
        "127.0.0.1:9901/healthz" in " ".join(hc.get("Test") or []),
        describe_healthcheck(hc),
    )


def describe_healthcheck(hc: dict[str, Any]) -> str:
    """One line: what the health check probes and how often (durations are in ns)."""
    if not hc.get("Test"):
        return "no Healthcheck in the config"
    test = " ".join(hc["Test"])
    url = re.search(r"https?://[^'\"\s]+", test)
    probe = f"{' '.join(hc['Test'][:2])} ... {url.group(0) if url else test[:60]}"
    times = ", ".join(
        f"{k.lower()} {v / 1e9:g}s"
        for k in ("Interval", "Timeout", "StartPeriod")
        if (v := hc.get(k))
    )
    return f"{probe}; {times}, retries {hc.get('Retries')}"


def check_sigterm(r: Results, pod: Pod) -> None:
    delay = seconds(pod.env.get("FAULTLINE_TIMEOUTS_SHUTDOWN_DELAY", "5s"))
    drain = seconds(pod.env.get("FAULTLINE_TIMEOUTS_DRAIN", "20s"))
    margin = 3.0
    slow_s = delay + min(1.0, drain / 2)  # still in flight when the listener closes
    slow: dict[str, object] = {}

    def in_flight() -> None:
        try:
            rep = get(pod.http_port, f"/slow?s={slow_s}", timeout=slow_s + drain + 10)
            slow["status"], slow["body"] = rep.status, rep.body.decode(errors="replace")
        except OSError as exc:
            slow["error"] = repr(exc)

    thread = threading.Thread(target=in_flight)
    thread.start()
    time.sleep(0.3)  # the slow request is at the app
    t0 = time.monotonic()
    podman("kill", "--signal", "TERM", pod.proxy)
    time.sleep(min(0.3, delay / 4))
    during: list[object] = []
    try:
        rz = get(pod.admin_port, "/readyz", timeout=2)
        px = get(pod.http_port, "/", timeout=2)
        during = [rz.status, px.status]
    except OSError as exc:
        during = [repr(exc), "-"]
    seen_at = time.monotonic() - t0
    waited = podman("wait", pod.proxy, timeout=delay + drain + 60)
    elapsed = time.monotonic() - t0
    code = waited.stdout.strip()
    thread.join(timeout=drain + 10)
    if delay > 0:
        r.check(
            "SIGTERM: draining, still serving during shutdown_delay",
            during == [503, 200],
            f"at +{seen_at:.1f}s: /readyz {during[0]}, proxied GET {during[1]} "
            f"(shutdown_delay {delay:g}s)",
        )
    r.check(
        "SIGTERM: in-flight request finished",
        slow.get("status") == 200 and slow.get("body") == pod.body,
        f"GET /slow?s={slow_s:g} started before SIGTERM -> {slow.get('status', slow.get('error'))}",
    )
    r.check(
        "SIGTERM: exit 0 within the drain time",
        code == "0" and elapsed <= delay + drain + margin,
        f"exit code {code} after {elapsed:.1f}s (limit shutdown_delay {delay:g}s + drain "
        f"{drain:g}s + {margin:g}s)",
    )
    logs = pod.logs(pod.proxy, 200)
    said = [ln for ln in logs.splitlines() if "drain" in ln.lower()]
    r.check(
        "SIGTERM: the log says it drained",
        bool(said),
        said[0].strip()[-120:] if said else "no line mentioning drain in `podman logs`",
    )


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Build the Faultline image with podman and check it runs as designed.",
    )
    p.add_argument(
        "--dockerfile",
        type=Path,
        default=REPO / "Dockerfile",
        help="the Dockerfile to build (default: the repo's; the context: the repo root)",
    )
    p.add_argument(
        "--sidecar-env",
        action="append",
        default=[],
        metavar="K=V",
        help="extra environment for the Faultline container (repeatable)",
    )
    p.add_argument(
        "--rebuild-base",
        action="store_true",
        help="make the stand-in FROM image anew even if one exists",
    )
    p.add_argument(
        "--remove-images",
        action="store_true",
        help="remove faultline:ci and the stand-in base at the end (the cache)",
    )
    p.add_argument("--keep-work", action="store_true", help="keep the work dir (logs, config)")
    return p.parse_args(argv)  # fmt: skip


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    dockerfile = args.dockerfile.resolve()
    env = dict(SIDECAR_ENV)
    for kv in args.sidecar_env:
        k, sep, v = kv.partition("=")
        if not sep:
            say(f"--sidecar-env {kv!r}: expected K=V")
            return 2
        env[k] = v

    # SIGTERM/SIGHUP to the stage: clean up as for Ctrl-C.
    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)

    work = Path(tempfile.mkdtemp(prefix="faultline-container-"))
    run_id = f"flct-{os.getpid()}-{secrets.token_hex(3)}"
    results = Results()
    times: dict[str, float] = {}
    pod: Pod | None = None
    base = ""
    try:
        step("tools")
        ensure_tools()
        configure_podman(work)

        step("stand-in for the FROM image")
        base = qualified(from_image(dockerfile))
        times["base"] = make_standin(from_image(dockerfile), work, args.rebuild_base)

        shown = dockerfile.relative_to(REPO) if dockerfile.is_relative_to(REPO) else dockerfile
        step(f"build {IMAGE} from {shown}")
        build(dockerfile, work, times)

        step("checks")
        t0 = time.monotonic()
        check_image(results)
        pod = Pod(run_id, work, base, env)
        say(f"sidecar env: {' '.join(f'{k}={v}' for k, v in env.items())}")
        pod.start()
        check_banner(results, pod)
        check_non_root(results, pod)
        check_read_only(results, pod)
        check_probes(results, pod)
        check_proxied(results, pod)
        check_healthcheck(results, pod)
        check_app_down(results, pod)
        check_sigterm(results, pod)
        times["checks"] = time.monotonic() - t0

        size = int(podman("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout.strip())
        base_size = int(podman("image", "inspect", "--format", "{{.Size}}", base).stdout.strip())
        say(f"image size: {IMAGE} {size / 1e6:.1f} MB (its stand-in base {base_size / 1e6:.1f} MB)")
    except Skip as exc:
        say(f"SKIP  container stage: {exc}")
        return 0
    except StageError as exc:
        results.check(PHASE[0], False, str(exc))
    except KeyboardInterrupt as exc:
        results.check(PHASE[0], False, f"interrupted ({exc or 'SIGINT'})")
    finally:
        if pod is not None:
            if results.failed:
                for name in (pod.proxy, pod.app):
                    say(f"--- last log lines of {name}:\n{pod.logs(name)}")
            pod.remove()
            left = podman(
                "ps", "-a", "--filter", f"name={run_id}", "--format", "{{.Names}}", check=False
            )
            if left.stdout.strip():
                say(f"WARNING: containers left behind: {left.stdout.strip()}")
        if args.remove_images and shutil.which("podman"):
            podman("rmi", "-f", IMAGE, check=False)
            if base:
                podman("rmi", "-f", base, check=False)
            say(f"removed the images {IMAGE} and {base}")
        if args.keep_work:
            say(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    total = time.monotonic() - started
    parts = ", ".join(f"{k} {v:.0f}s" for k, v in times.items())
    say(f"times: {parts}{', ' if parts else ''}total {total:.0f}s")
    verdict = "FAILED: " + ", ".join(results.failed) if results.failed else "OK"
    say(f"container stage {verdict}")
    say(f"container: {results.passed} passed, {len(results.failed)} failed")
    return 1 if results.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
