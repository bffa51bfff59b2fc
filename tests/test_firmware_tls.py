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

    def __init__(self, cert: Path, key: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert), str(key))
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
