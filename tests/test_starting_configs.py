"""config/dev.yaml and config/sidecar.yaml: the two users' starting points are valid
(`faultline check-config` accepts them) and say what each user needs."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from proxy.config import load_config

from support import ROOT

DEFAULTS = load_config(env={})


@pytest.mark.parametrize("name", ["dev.yaml", "sidecar.yaml"])
def test_check_config_accepts_it(name: str):
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", str(ROOT / "config" / name)],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr == b""
    effective = yaml.safe_load(result.stdout)
    assert effective["upstream"] == "http://127.0.0.1:3000"


def test_dev_holds_requests_while_the_dev_server_restarts_and_talks_to_a_human():
    config = load_config(str(ROOT / "config" / "dev.yaml"), env={})
    assert config.listen == ("127.0.0.1", 8080)  # this machine only
    assert config.admin.listen[0] == "127.0.0.1"
    assert config.upstream == "http://127.0.0.1:3000"
    assert 5 <= config.upstream_wait <= 30
    assert config.log.format == "pretty" and config.log.access and not config.log.quiet
    t, d = config.timeouts, DEFAULTS.timeouts
    # Short timeouts: a stuck dev server shows up quickly, and Ctrl-C is quick.
    assert t.connect < d.connect and t.response_headers < d.response_headers
    assert t.upstream_read < d.upstream_read and t.drain <= 5 and t.shutdown_delay == 0


def test_sidecar_drains_for_kubernetes_and_logs_json():
    config = load_config(str(ROOT / "config" / "sidecar.yaml"), env={})
    assert config.listen == ("0.0.0.0", 8080)
    assert config.admin.listen == ("0.0.0.0", 9901)
    assert config.timeouts.shutdown_delay == 5 and config.timeouts.drain == 20
    assert config.log.format == "json"
    assert config.upstream_wait == 0
