"""The firmware's TLS (sense.tls under the real micropython) accepts the broker's
certificate and refuses a wrong host name, an expired and a self-signed certificate."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from opensense.mqtt.ca import make_ca, make_server_cert, write_pair

from .firmware.runner import HERE, run_mp


class TlsServer:
    """A TLS listener presenting one certificate; it only completes handshakes."""

    def __init__(self, cert: Path, key: Path, minimum: ssl.TLSVersion | None = None) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert), str(key))
        if minimum is not None:
            self.ctx.minimum_version = minimum
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.stopping = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stopping:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                with self.ctx.wrap_socket(c, server_side=True) as t:
                    t.settimeout(5)
                    t.recv(5)
            except (OSError, ssl.SSLError):
                pass

    def close(self) -> None:
        self.stopping = True
        self.sock.close()


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[dict[str, object]]:
    now = dt.datetime.now(dt.UTC)
    ca_key, ca = make_ca()
    (tmp_path / "ca.der").write_bytes(ca.public_bytes(serialization.Encoding.DER))
    good = write_pair(tmp_path, "good", *make_server_cert(ca_key, ca, ["mqtt.shop.example"]))
    expired = write_pair(
        tmp_path,
        "expired",
        *make_server_cert(
            ca_key, ca, ["mqtt.shop.example"], now=now - dt.timedelta(days=30), days=10
        ),
    )
    other_key, other = make_ca("mqtt.shop.example")  # self-signed, right name, no CA
    selfsigned = write_pair(tmp_path, "self", other_key, other)
    servers = {
        name: TlsServer(cert, key)
        for name, (key, cert) in (("good", good), ("expired", expired), ("self", selfsigned))
    }
    servers["tls13"] = TlsServer(good[1], good[0], ssl.TLSVersion.TLSv1_3)
    yield {"ca": tmp_path / "ca.der", **servers}
    for s in servers.values():
        s.close()


def handshake(pki: dict[str, object], server: str, host: str = "mqtt.shop.example") -> str:
    srv = pki[server]
    assert isinstance(srv, TlsServer)
    r = run_mp(HERE / "mp_tls.py", host, str(srv.port), str(pki["ca"]), timeout=60)
    return (r.stdout + r.stderr).strip()


def test_the_brokers_certificate_is_accepted(pki):
    assert handshake(pki, "good") == "ok"


def test_wrong_host_name_is_refused(pki):
    out = handshake(pki, "good", host="other.example")
    assert out.startswith("refused") and "does not match" in out, out


def test_expired_certificate_is_refused(pki):
    out = handshake(pki, "expired")
    assert out.startswith("refused") and "expired" in out, out


def test_self_signed_certificate_is_refused(pki):
    out = handshake(pki, "self")
    assert out.startswith("refused") and "not correctly signed" in out, out


def test_the_firmware_speaks_tls_1_2_only(pki):
    """Why the brokers' listeners accept TLS 1.2 (not 1.3 only, docs/security.md):
    MicroPython's mbedtls offers no TLS 1.3, so a 1.3-only listener locks every node
    out. When this fails, the nodes can do 1.3 and the listeners can require it."""
    out = handshake(pki, "tls13")
    assert out.startswith("refused"), out
