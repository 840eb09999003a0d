"""The command line and the configuration tree: one clear line and exit 2 for bad input."""

from __future__ import annotations

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
