"""TLS on the listen port (`--tls-cert/--tls-key`, config `tls.cert`/`tls.key`), with ALPN
offering h2 then http/1.1: curl picks HTTP/2 or HTTP/1.1 on the same port, each exchange
tagged and counted as usual; a half-given pair or an unusable key is one clear line.
"""

from __future__ import annotations

import shutil

import pytest
import trustme

from proxy.config import ConfigError, load_config
from proxy.server import ProxyServer, StartupError

from support import LOOPBACK, curl

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


@pytest.fixture
def certificate(tmp_path):
    ca = trustme.CA()
    leaf = ca.issue_cert(LOOPBACK, "localhost")
    cert, key, bundle = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    leaf.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    ca.cert_pem.write_to_path(str(bundle))
    return str(cert), str(key), str(bundle)


@pytest.mark.parametrize(
    ("flag", "first_line"), [("--http2", b"HTTP/2 200"), ("--http1.1", b"HTTP/1.1 200")]
)
async def test_alpn_picks_the_protocol_on_one_tls_port(
    flag, first_line, certificate, recording, proxy_factory
):
    cert, key, bundle = certificate
    proxy = await proxy_factory(recording.url, **{"tls.cert": cert, "tls.key": key})
    code, out, err = await curl(
        flag, "--cacert", bundle, "-i", f"https://{LOOPBACK}:{proxy.port}/secure"
    )
    assert code == 0, err
    assert out.startswith(first_line), out[:200]
    assert out.endswith(b"from-app!")
    assert b"proxy-status: faultline; received-status=200" in out.lower()
    await proxy.settle()
    assert proxy.stats.counts == {(200, "origin", None): 1}
    (line,) = proxy.access_log()
    assert line["protocol"] == ("h2" if flag == "--http2" else "http/1.1")
    # The origin learns the client's scheme (it was http whatever the listen port spoke).
    assert b"\r\nX-Forwarded-Proto: https\r\n" in recording.received_bytes()


def test_a_certificate_without_its_key_is_refused_in_one_line(certificate):
    cert, _, _ = certificate
    with pytest.raises(ConfigError) as caught:
        load_config(env={}, flags={("tls", "cert"): cert})
    assert str(caught.value) == (
        "tls.cert is set but tls.key is not: TLS on the listen port needs both "
        "(--tls-cert and --tls-key)"
    )


async def test_an_unusable_key_stops_the_start_with_one_line(certificate, tmp_path):
    cert, _, _ = certificate
    wrong = tmp_path / "not-a-key.pem"
    wrong.write_text("not a key\n")
    config = load_config(
        env={},
        flags={
            ("listen",): f"{LOOPBACK}:0",
            ("admin", "listen"): f"{LOOPBACK}:0",
            ("tls", "cert"): cert,
            ("tls", "key"): str(wrong),
        },
    )
    with pytest.raises(StartupError) as caught:
        await ProxyServer(config).start()
    message = str(caught.value)
    assert message.startswith(f"cannot use tls.cert {cert} with tls.key {wrong}: "), message
    assert "\n" not in message
