"""The command line and the configuration tree: one clear line and exit 2 for bad input."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import pytest
import yaml

from proxy.config import (
    LEAF_KEYS,
    Config,
    ConfigError,
    build_config,
    describe_interface,
    load_config,
    parse_duration,
)

from support import LOOPBACK, ROOT, free_port

DOCUMENTED = ROOT / "config" / "faultline.yaml"


def faultline(*args: str, env: dict[str, str] | None = None, timeout: float = 20):
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )


def assert_one_line_error(result, *needles: str) -> None:
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("5s", 5.0), ("2m", 120.0), ("1h", 3600.0), ("3", 3.0), (1.5, 1.5)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_documented_config_holds_every_key_with_its_default():
    data = yaml.safe_load(DOCUMENTED.read_text())
    documented = build_config(data)
    assert documented == Config()
    flat: set[tuple[str, ...]] = set()

    def walk(node, prefix=()):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, (*prefix, key))
            else:
                flat.add((*prefix, key))

    walk(data)
    assert flat == set(LEAF_KEYS)


def test_precedence_flag_over_env_over_file(tmp_path):
    file = tmp_path / "f.yaml"
    file.write_text("timeouts: {connect: 1s, drain: 2s, keepalive: 3s}\n")
    config = load_config(
        str(file),
        env={"FAULTLINE_TIMEOUTS_DRAIN": "20s", "FAULTLINE_TIMEOUTS_KEEPALIVE": "30s"},
        flags={("timeouts", "keepalive"): "300s"},
    )
    assert (config.timeouts.connect, config.timeouts.drain, config.timeouts.keepalive) == (
        1.0,
        20.0,
        300.0,
    )


def test_env_twin_of_the_admin_flag():
    assert load_config(env={"FAULTLINE_ADMIN": "0.0.0.0:9999"}).admin.listen == ("0.0.0.0", 9999)


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"FAULTLINE_TIMEOUTS_CONNECT": "soon"}, "timeouts.connect"),
        ({"FAULTLINE_UPSTREAM": "ftp://x"}, "upstream"),
        ({"FAULTLINE_LISTEN": "nowhere"}, "listen"),
        ({"FAULTLINE_LIMITS_MAX_IN_FLIGHT": "-1"}, "limits.max_in_flight"),
        ({"FAULTLINE_PROXY_NAME": "bad name"}, "proxy_name"),
        ({"FAULTLINE_TRUSTED_PROXIES": "10.0.0.0/33"}, "trusted_proxies"),
    ],
)
def test_bad_values_name_the_key_and_the_source(env, needle):
    with pytest.raises(ConfigError) as err:
        load_config(env=env)
    message = str(err.value)
    assert needle in message and next(iter(env)) in message and "\n" not in message


def test_check_config_prints_the_effective_configuration():
    result = faultline("check-config", str(DOCUMENTED))
    assert result.returncode == 0, result.stderr
    effective = yaml.safe_load(result.stdout)
    assert effective["listen"] == "0.0.0.0:8080"
    assert effective["timeouts"]["connect"] == 5.0


def test_check_config_rejects_an_unknown_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("timeouts:\n  conect: 5s\n")
    assert_one_line_error(faultline("check-config", str(bad)), "timeouts.conect", "unknown key")


def test_check_config_rejects_a_file_that_is_not_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("timeouts: [unclosed\n")
    assert_one_line_error(faultline("check-config", str(bad)), "not valid YAML")


def test_serve_with_a_bad_duration_exits_2_naming_the_key():
    result = faultline(
        "serve", "--upstream", "http://127.0.0.1:1", env={"FAULTLINE_TIMEOUTS_CONNECT": "5x"}
    )
    assert_one_line_error(result, "timeouts.connect", "FAULTLINE_TIMEOUTS_CONNECT")


def test_serve_on_a_busy_port_exits_2_naming_the_address():
    with socket.socket() as busy:
        busy.bind((LOOPBACK, 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = faultline(
            "serve",
            "--upstream",
            "http://127.0.0.1:1",
            "--listen",
            f"{LOOPBACK}:{port}",
            "--admin",
            f"{LOOPBACK}:{free_port()}",
        )
    assert_one_line_error(result, f"{LOOPBACK}:{port}", "already in use")


def test_serve_on_an_address_not_on_this_machine_exits_2():
    result = faultline("serve", "--upstream", "http://127.0.0.1:1", "--listen", "192.0.2.1:8080")
    assert_one_line_error(result, "192.0.2.1:8080", "not available")


def test_an_unknown_key_in_the_file_suggests_the_nearest(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("upstram: http://127.0.0.1:3000\n")
    result = faultline("check-config", str(bad))
    assert_one_line_error(result, "unknown key 'upstram': did you mean 'upstream'?", str(bad))


def test_serve_with_an_unknown_environment_twin_exits_2_suggesting_the_nearest():
    result = faultline(
        "serve", "--upstream", "http://127.0.0.1:1", env={"FAULTLINE_TIMEOUTS_CONECT": "1s"}
    )
    assert_one_line_error(
        result,
        "unknown environment variable 'FAULTLINE_TIMEOUTS_CONECT'",
        "did you mean 'FAULTLINE_TIMEOUTS_CONNECT' (timeouts.connect)?",
    )


def test_check_config_takes_bare_ports(tmp_path):
    """A bare port in the file or the environment: the proxy's binds all interfaces, the
    admin server's this machine only (their defaults' interfaces)."""
    file = tmp_path / "ports.yaml"
    file.write_text("listen: 8080\nadmin: {listen: 9902}\n")
    result = faultline("check-config", str(file))
    assert result.returncode == 0, result.stderr
    effective = yaml.safe_load(result.stdout)
    assert (effective["listen"], effective["admin"]["listen"]) == ("0.0.0.0:8080", "127.0.0.1:9902")
    result = faultline(
        "check-config", str(DOCUMENTED), env={"FAULTLINE_LISTEN": "8081", "FAULTLINE_ADMIN": "9903"}
    )
    assert result.returncode == 0, result.stderr
    effective = yaml.safe_load(result.stdout)
    assert (effective["listen"], effective["admin"]["listen"]) == ("0.0.0.0:8081", "127.0.0.1:9903")


def test_help_says_which_interface_a_bare_port_binds():
    result = faultline("serve", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "--listen [HOST:]PORT" in text and "--admin [HOST:]PORT" in text
    assert "a bare port (--listen 8080) binds all interfaces, 0.0.0.0" in text
    assert "a bare port (--admin 9901) binds 127.0.0.1, this machine only" in text
    demo = " ".join(faultline("demo", "--help").stdout.split())
    assert "a bare port binds 127.0.0.1, this machine only" in demo


def _startup_line(cmd: list[str], needle: str) -> str:
    """Start `faultline ...`, return its first stderr line holding `needle`, stop it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", *cmd],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if needle in line:
                return line.strip()
        raise AssertionError(f"no line with {needle!r}; exit {proc.wait(5)}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_serve_says_the_interface_it_bound_and_takes_a_bare_admin_port():
    port, admin_port = free_port(), free_port()
    line = _startup_line(
        [
            "serve",
            "--upstream",
            "http://127.0.0.1:1",
            "--listen",
            f"{LOOPBACK}:{port}",
            "--admin",
            str(admin_port),  # a bare port: 127.0.0.1, like the default
        ],
        "listening on",
    )
    assert f"proxy listening on {LOOPBACK}:{port} (this machine only)" in line, line
    assert f"admin on 127.0.0.1:{admin_port} (this machine only)" in line, line


def test_demo_takes_bare_ports_and_says_it_binds_this_machine_only():
    port, admin_port = free_port(), free_port()
    line = _startup_line(
        ["demo", "--listen", str(port), "--admin", str(admin_port)], "listening on"
    )
    assert line.endswith(f"demo, listening on 127.0.0.1:{port} (this machine only)"), line


@pytest.mark.parametrize(
    ("host", "words"),
    [
        ("0.0.0.0", "all interfaces"),
        ("::", "all interfaces"),
        ("127.0.0.1", "this machine only"),
        ("127.0.0.53", "this machine only"),
        ("::1", "this machine only"),
        ("192.0.2.7", "this address only"),
        ("fe80::1%eth0", "this address only"),
    ],
)
def test_the_startup_line_words_for_each_interface(host, words):
    assert describe_interface(host) == words
