"""The configuration tree on msgspec: what each source may give, and one line per mistake."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from proxy.config import Config, ConfigError, build_config, load_config

from support import ROOT


def test_environment_strings_become_typed_values():
    config = load_config(
        env={
            "FAULTLINE_TIMEOUTS_CONNECT": "250ms",
            "FAULTLINE_UPSTREAM_WAIT": "1.5",
            "FAULTLINE_LIMITS_MAX_IN_FLIGHT": "10",
            "FAULTLINE_LIMITS_MAX_REQUEST_BODY_BYTES": "0",
            "FAULTLINE_POOL_MAX_IDLE": " 12\n",  # from a file or a YAML block scalar
            "FAULTLINE_STATS_RECENT_ERRORS": "1_000",
            "FAULTLINE_HEADERS_VIA": "false",
            "FAULTLINE_HEADERS_FORWARDED": "0",
            "FAULTLINE_LOG_QUIET": "1",
            "FAULTLINE_LOG_ACCESS": "off",
            "FAULTLINE_TLS_VERIFY": "No",
            "FAULTLINE_DIAGNOSTICS": "TRUE",
            "FAULTLINE_LOG_FORMAT": "json",
            "FAULTLINE_LOG_REDACT_QUERY": "token, sig",
            "FAULTLINE_TRUSTED_PROXIES": "10.0.0.0/8,::1",
            "FAULTLINE_LISTEN": "[::1]:8081",
            "FAULTLINE_ADMIN_TOKEN": "12345",
            "FAULTLINE_UPSTREAM": "https://example.test",
        }
    )
    assert config.timeouts.connect == 0.25 and config.upstream_wait == 1.5
    assert config.limits.max_in_flight == 10 and config.limits.max_request_body_bytes == 0
    assert config.pool.max_idle == 12 and config.stats.recent_errors == 1000
    assert (config.headers.via, config.headers.forwarded, config.headers.proxy_status) == (
        False,
        False,
        True,
    )
    assert config.log.quiet is True and config.log.access is False
    assert config.tls.verify is False and config.diagnostics is True
    assert config.log.format == "json" and config.log.redact_query == ["token", "sig"]
    assert config.trusted_proxies == ["10.0.0.0/8", "::1"]
    assert config.listen == ("::1", 8081) and config.admin.token == "12345"
    assert (config.upstream, config.upstream_port, config.upstream_authority) == (
        "https://example.test:443",
        443,
        "example.test:443",
    )


def test_file_values_keep_their_yaml_types(tmp_path):
    file = tmp_path / "f.yaml"
    file.write_text(
        "listen: 127.0.0.1:9000\nheaders: {via: no}\nlimits: {max_in_flight: 7}\n"
        "log: {redact_query: [a, b]}\ntimeouts: {drain: 3}\n"
    )
    config = load_config(str(file), env={})
    assert config.listen == ("127.0.0.1", 9000) and config.headers.via is False
    assert config.limits.max_in_flight == 7 and config.log.redact_query == ["a", "b"]
    assert config.timeouts.drain == 3.0


def _error(env=None, file_text=None, tmp_path=None) -> str:
    file = None
    if file_text is not None:
        file = tmp_path / "file.yaml"
        file.write_text(file_text)
    with pytest.raises(ConfigError) as err:
        load_config(str(file) if file else None, env=env or {})
    message = str(err.value)
    assert "\n" not in message and message.startswith("config error: ")
    return message


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"FAULTLINE_TIMEOUTS_CONNECT": "x"},
            "config error: timeouts.connect: invalid duration 'x' (use 250ms, 5s, 2m or a "
            "number of seconds) (from FAULTLINE_TIMEOUTS_CONNECT)",
        ),
        (
            {"FAULTLINE_LIMITS_MAX_IN_FLIGHT": "0"},
            "config error: limits.max_in_flight: expected an integer >= 1, got 0 "
            "(from FAULTLINE_LIMITS_MAX_IN_FLIGHT)",
        ),
        (
            {"FAULTLINE_LIMITS_MAX_REQUEST_BODY_BYTES": "-1"},
            "config error: limits.max_request_body_bytes: expected an integer >= 0, got -1 "
            "(from FAULTLINE_LIMITS_MAX_REQUEST_BODY_BYTES)",
        ),
        (
            {"FAULTLINE_POOL_MAX_IDLE": "many"},
            "config error: pool.max_idle: expected an integer, got 'many' "
            "(from FAULTLINE_POOL_MAX_IDLE)",
        ),
        (
            {"FAULTLINE_HEADERS_VIA": "maybe"},
            "config error: headers.via: invalid boolean 'maybe' (use true or false) "
            "(from FAULTLINE_HEADERS_VIA)",
        ),
        (
            {"FAULTLINE_LOG_FORMAT": "xml"},
            "config error: log.format: expected one of 'auto', 'json', 'pretty', got 'xml' "
            "(from FAULTLINE_LOG_FORMAT)",
        ),
    ],
)
def test_bad_environment_values_are_one_exact_line(env, expected):
    assert _error(env) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("foo: 1\n", "config error: unknown key 'foo' (in {file})"),
        (
            "timeouts: {conect: 5s}\n",
            "config error: unknown key 'timeouts.conect': did you mean 'timeouts.connect'? "
            "(in {file})",
        ),
        ("1: x\n", "config error: unknown key '1' (in {file})"),
        (
            "limits: {max_in_flight: [1, 2]}\n",
            "config error: limits.max_in_flight: expected an integer, got [1, 2] (in {file})",
        ),
        (
            "limits: {max_in_flight: 2.5}\n",
            "config error: limits.max_in_flight: expected an integer, got 2.5 (in {file})",
        ),
        (
            "pool: {max_idle: no}\n",
            "config error: pool.max_idle: expected an integer, got False (in {file})",
        ),
        ("timeouts: 5\n", "config error: timeouts: expected a mapping of keys, got 5 (in {file})"),
        ("tls: {ca_file: 5}\n", "config error: tls.ca_file: expected a string, got 5 (in {file})"),
        (
            "log: {redact_query: 5}\n",
            "config error: log.redact_query: expected a list, got 5 (in {file})",
        ),
    ],
    ids=[
        "unknown-key",
        "unknown-nested-key",
        "numeric-key",
        "list-for-integer",
        "float-for-integer",
        "boolean-for-integer",
        "scalar-for-section",
        "integer-for-string",
        "integer-for-list",
    ],
)
def test_bad_file_values_are_one_exact_line(tmp_path, text, expected):
    assert _error(file_text=text, tmp_path=tmp_path) == expected.format(file=tmp_path / "file.yaml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("upstram: http://127.0.0.1:3000\n", "unknown key 'upstram': did you mean 'upstream'?"),
        (
            "timeouts:\n  conect: 1s\n",
            "unknown key 'timeouts.conect': did you mean 'timeouts.connect'?",
        ),
        ("timeout: {connect: 1s}\n", "unknown key 'timeout': did you mean 'timeouts'?"),
        ("drain: 5s\n", "unknown key 'drain': did you mean 'timeouts.drain'?"),
        ("admin: {tokn: x}\n", "unknown key 'admin.tokn': did you mean 'admin.token'?"),
        ("limits: {max_inflight: 5}\n", "did you mean 'limits.max_in_flight'?"),
    ],
    ids=[
        "upstram",
        "conect-in-block",
        "timeout-section",
        "drain-top-level",
        "tokn",
        "max-inflight",
    ],
)
def test_an_unknown_file_key_names_the_nearest_known_one(tmp_path, text, expected):
    message = _error(file_text=text, tmp_path=tmp_path)
    assert expected in message and message.endswith(f"(in {tmp_path / 'file.yaml'})"), message


def test_an_unknown_file_key_far_from_every_known_one_gets_no_guess(tmp_path):
    message = _error(file_text="colour: true\n", tmp_path=tmp_path)
    assert message == f"config error: unknown key 'colour' (in {tmp_path / 'file.yaml'})"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "FAULTLINE_UPSTRAM",
            "config error: unknown environment variable 'FAULTLINE_UPSTRAM': did you mean "
            "'FAULTLINE_UPSTREAM' (upstream)?",
        ),
        (
            "FAULTLINE_TIMEOUTS_CONECT",
            "config error: unknown environment variable 'FAULTLINE_TIMEOUTS_CONECT': did you mean "
            "'FAULTLINE_TIMEOUTS_CONNECT' (timeouts.connect)?",
        ),
        (
            "FAULTLINE_DRAIN",
            "config error: unknown environment variable 'FAULTLINE_DRAIN': did you mean "
            "'FAULTLINE_TIMEOUTS_DRAIN' (timeouts.drain)?",
        ),
        (
            "FAULTLINE_ADMIN_LISEN",
            "config error: unknown environment variable 'FAULTLINE_ADMIN_LISEN': did you mean "
            "'FAULTLINE_ADMIN_LISTEN' (admin.listen)?",
        ),
        ("FAULTLINE_COLOUR", "config error: unknown environment variable 'FAULTLINE_COLOUR'"),
    ],
)
def test_an_unknown_environment_twin_is_one_line_naming_the_nearest(name, expected):
    assert _error({name: "1s", "FAULTLINE_TIMEOUTS_CONNECT": "1s"}) == expected


@pytest.mark.parametrize(
    "name",
    [
        "FAULTLINE_CONFIG",  # the file, read by load_config itself
        "FAULTLINE_COMPILE",  # the build's
        "FAULTLINE_REQUIRE_TOOLS",  # the test suite's
        "FAULTLINE_EXPECT_COMPILED",
        "FAULTLINE_SERVICE_HOST",  # Kubernetes, for a Service named faultline
        "FAULTLINE_SERVICE_PORT_HTTP",
        "FAULTLINE_PORT",
        "FAULTLINE_PORT_8080_TCP_ADDR",
    ],
)
def test_faultline_variables_that_are_not_configuration_are_left_alone(name, tmp_path):
    value = str(tmp_path / "empty.yaml") if name == "FAULTLINE_CONFIG" else "1"
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(env={name: value}) == Config()


@pytest.mark.parametrize(
    ("source", "listen", "admin"),
    [
        ("flags", ("0.0.0.0", 8080), ("127.0.0.1", 9902)),
        ("env", ("0.0.0.0", 8080), ("127.0.0.1", 9902)),
        ("env-admin-listen", ("0.0.0.0", 8080), ("127.0.0.1", 9902)),
        ("file", ("0.0.0.0", 8080), ("127.0.0.1", 9902)),
        ("file-text", ("0.0.0.0", 8080), ("127.0.0.1", 9902)),
    ],
)
def test_a_bare_port_binds_the_default_interface_of_its_option(tmp_path, source, listen, admin):
    """`--listen 8080` is 0.0.0.0:8080 (the listen default's interface); `--admin 9902` is
    127.0.0.1:9902 (the admin default's: this machine only), from every source."""
    file = tmp_path / "f.yaml"
    file.write_text(
        "listen: 8080\nadmin: {listen: 9902}\n"
        if source == "file"
        else "listen: '8080'\nadmin: {listen: ' 9902 '}\n"
    )
    if source == "flags":
        config = load_config(env={}, flags={("listen",): "8080", ("admin", "listen"): "9902"})
    elif source == "env":
        config = load_config(env={"FAULTLINE_LISTEN": "8080", "FAULTLINE_ADMIN": "9902"})
    elif source == "env-admin-listen":
        config = load_config(env={"FAULTLINE_LISTEN": "8080", "FAULTLINE_ADMIN_LISTEN": "9902"})
    else:
        config = load_config(str(file), env={})
    assert (config.listen, config.admin.listen) == (listen, admin)


def test_an_address_with_a_host_or_an_empty_host_keeps_it():
    config = load_config(env={"FAULTLINE_LISTEN": "127.0.0.1:8081", "FAULTLINE_ADMIN": ":9903"})
    assert config.listen == ("127.0.0.1", 8081) and config.admin.listen == ("0.0.0.0", 9903)
    for bad in ("true", "808o", "70000", "host:"):
        with pytest.raises(ConfigError, match="listen"):
            load_config(env={"FAULTLINE_LISTEN": bad})


def test_the_tree_is_frozen_and_building_it_keeps_the_given_data():
    given = {"timeouts": {"connect": "1s"}, "log": {"redact_query": "a,b"}}
    config = build_config(given)
    assert given == {"timeouts": {"connect": "1s"}, "log": {"redact_query": "a,b"}}
    assert config == build_config({"timeouts": {"connect": 1}, "log": {"redact_query": ["a", "b"]}})
    with pytest.raises(AttributeError):
        config.timeouts.connect = 2.0  # type: ignore[misc]
    with pytest.raises(AttributeError):
        config.listen = ("0.0.0.0", 1)  # type: ignore[misc]


def test_effective_is_plain_data_with_addresses_as_text_and_the_token_hidden():
    effective = load_config(env={"FAULTLINE_ADMIN_TOKEN": "s3cret"}).effective()
    assert effective["listen"] == "0.0.0.0:8080"
    assert effective["admin"] == {"listen": "127.0.0.1:9901", "token": "<set>"}
    assert effective["trusted_proxies"] == [] and isinstance(effective["log"]["redact_query"], list)
    assert yaml.safe_load(yaml.safe_dump(effective)) == effective
    assert Config().effective()["admin"]["token"] is None


def test_pydantic_stays_out_of_the_serving_process():
    """Issue #6: pydantic cost ~9 MB of RSS; the proxy must not import it again."""
    code = (
        "import sys; import proxy.cli, proxy.server, proxy.config;"
        "proxy.config.load_config(env={'FAULTLINE_TIMEOUTS_CONNECT': '1s'});"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pydantic'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
