"""A private certificate authority for the MQTT TLS listener, made on first start.

Nodes verify the broker against this CA (CERT_REQUIRED, CA as DER bytes on the
ESP32), so a node never talks to a broker it was not given. The CA key stays in the
state directory (mode 0600); `opensense ca` prints the CA certificate (PEM, or DER
for the firmware) to give to installers. A certificate for a real host name (e.g.
from Let's Encrypt) can replace the server pair: put `server.pem`/`server.key` in
<state_dir>/mqtt-tls/ and it is used as it is.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..statedir import private_dir, write_secret

log = logging.getLogger(__name__)

CA_DAYS = 3650
SERVER_DAYS = 825


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path

    def ca_der(self) -> bytes:
        cert = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
        return cert.public_bytes(serialization.Encoding.DER)


def _write_private(path: Path, data: bytes) -> None:
    # a new 0600 file renamed into place: O_TRUNC on an existing file kept its old mode
    write_secret(path, data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(
    common_name: str = "OpenSense private CA", now: dt.datetime | None = None, days: int = CA_DAYS
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    now = now or dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: list[str],
    now: dt.datetime | None = None,
    days: int = SERVER_DAYS,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A server certificate for `hosts` (DNS names or IP addresses), signed by the CA.
    `now`/`days` let tests make expired certificates."""
    now = now or dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def cert_hosts(cert: x509.Certificate) -> set[str]:
    """The DNS names and IP addresses a certificate is for (its SANs)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return set(san.get_values_for_type(x509.DNSName)) | {
        str(a) for a in san.get_values_for_type(x509.IPAddress)
    }


def _ours_for_other_hosts(files: TlsFiles, hosts: list[str]) -> bool:
    """True when the server certificate is one this CA issued for other names than
    `hosts` (OPENSENSE_MQTT_HOSTNAMES changed since): it is issued again, else the new
    name is silently never on it and nodes using it refuse the broker (issue 17 item
    10). A certificate from elsewhere (e.g. Let's Encrypt) is never touched."""
    try:
        cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
        ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
        cert.verify_directly_issued_by(ca)
    except (OSError, ValueError, TypeError, InvalidSignature):
        return False
    if cert_hosts(cert) == set(hosts):
        return False
    log.warning(
        "MQTT server certificate issued again for %s (it was for %s): OPENSENSE_MQTT_HOSTNAMES "
        "changed",
        ", ".join(hosts),
        ", ".join(sorted(cert_hosts(cert))),
    )
    return True


def ensure_tls(state_dir: Path, hosts: list[str]) -> TlsFiles:
    """The CA and server pair in <state_dir>/mqtt-tls/, made once and then reused; the
    server certificate is issued again when `hosts` changed."""
    d = private_dir(state_dir / "mqtt-tls")
    files = TlsFiles(d / "ca.pem", d / "server.pem", d / "server.key")
    ca_key_path = d / "ca.key"
    if not files.ca_cert.exists():
        key, cert = make_ca()
        _write_private(ca_key_path, _key_pem(key))
        files.ca_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if (
        not files.server_cert.exists()
        or not files.server_key.exists()
        or _ours_for_other_hosts(files, hosts)
    ):
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
        key, cert = make_server_cert(ca_key, ca_cert, hosts)
        _write_private(files.server_key, _key_pem(key))
        files.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files


def write_pair(
    directory: Path, name: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
) -> tuple[Path, Path]:
    """Write a key and certificate as PEM files (tests use it for bad certificates)."""
    directory.mkdir(parents=True, exist_ok=True)
    kp, cp = directory / f"{name}.key", directory / f"{name}.pem"
    _write_private(kp, _key_pem(key))
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return kp, cp
