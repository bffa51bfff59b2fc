"""C2SP signed notes (https://c2sp.org/signed-note) carrying C2SP tlog-checkpoints
(https://c2sp.org/tlog-checkpoint), with Ed25519. Pure, except for key files.

Checkpoint body:   <origin>\\n<tree size>\\n<base64 root hash>\\n
Signed note:       body, a blank line, then one line per signature:
                   "— <key name> <base64(key id (4 bytes) || Ed25519 signature)>\\n"
Key id:            SHA-256(key name || 0x0A || 0x01 || public key)[:4]
Verifier key text: <key name>+<hex key id>+<base64(0x01 || public key)>
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALG_ED25519 = b"\x01"
DASH = "\u2014"


class NoteError(ValueError):
    """A checkpoint or note that is malformed or not signed by the expected key."""


def _raw_public(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(name: str, pub: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + ALG_ED25519 + pub).digest()[:4]


@dataclass(frozen=True)
class Signer:
    name: str
    key: Ed25519PrivateKey

    @property
    def public(self) -> bytes:
        return _raw_public(self.key.public_key())

    def verifier_key(self) -> str:
        pub = self.public
        return f"{self.name}+{key_id(self.name, pub).hex()}+{base64.b64encode(ALG_ED25519 + pub).decode()}"

    def sign(self, text: str) -> str:
        if not text.endswith("\n"):
            raise NoteError("a note's text ends with a newline")
        sig = self.key.sign(text.encode())
        blob = base64.b64encode(key_id(self.name, self.public) + sig).decode()
        return f"{text}\n{DASH} {self.name} {blob}\n"


@dataclass(frozen=True)
class Verifier:
    name: str
    id: bytes
    key: Ed25519PublicKey

    @classmethod
    def parse(cls, vkey: str) -> Verifier:
        try:
            name, hexid, b64 = vkey.strip().split("+", 2)
            raw = base64.b64decode(b64, validate=True)
        except ValueError as exc:
            raise NoteError(f"not a verifier key (name+hexid+base64): {vkey[:60]!r}") from exc
        if raw[:1] != ALG_ED25519 or len(raw) != 33:
            raise NoteError("the verifier key is not an Ed25519 key")
        if key_id(name, raw[1:]).hex() != hexid:
            raise NoteError("the verifier key's id does not match its name and key")
        return cls(name, bytes.fromhex(hexid), Ed25519PublicKey.from_public_bytes(raw[1:]))

    def open(self, note: str) -> str:
        """The note's text if one of its signatures is this key's and valid."""
        # The text may itself contain blank lines; signatures follow the LAST one.
        idx = note.rfind("\n\n")
        if idx < 0:
            raise NoteError("not a signed note (no blank line before the signatures)")
        text, sigs = note[: idx + 1], note[idx + 2 :]
        for line in sigs.splitlines():
            if not line.startswith(DASH + " "):
                raise NoteError(f"malformed signature line {line[:60]!r}")
            try:
                name, b64 = line[2:].rsplit(" ", 1)
                blob = base64.b64decode(b64, validate=True)
            except ValueError as exc:
                raise NoteError(f"malformed signature line {line[:60]!r}") from exc
            if name != self.name or blob[:4] != self.id:
                continue
            try:
                self.key.verify(blob[4:], text.encode())
            except InvalidSignature:
                raise NoteError(f"the signature by {name} does not verify") from None
            return text
        raise NoteError(f"the note carries no signature by {self.name}")


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def text(self) -> str:
        lines = [
            self.origin,
            str(self.size),
            base64.b64encode(self.root).decode(),
            *self.extensions,
        ]
        return "\n".join(lines) + "\n"

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        lines = text.split("\n")
        if len(lines) < 4 or lines[-1] != "":
            raise NoteError("a checkpoint has origin, size and root hash lines")
        origin, size, root = lines[0], lines[1], lines[2]
        if not size.isdigit() or (size != "0" and size.startswith("0")):
            raise NoteError(f"checkpoint size {size!r} is not a decimal number")
        try:
            raw = base64.b64decode(root, validate=True)
        except ValueError as exc:
            raise NoteError("checkpoint root hash is not base64") from exc
        if len(raw) != 32:
            raise NoteError("checkpoint root hash is not 32 bytes")
        return cls(origin, int(size), raw, tuple(lines[3:-1]))


def generate_key(path: Path, name: str) -> Signer:
    """A new Ed25519 key written to `path` (mode 0600, PEM, with the key name)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(f"# opensense audit signing key: {name}\n".encode() + pem)
    return Signer(name, key)


def load_key(path: Path) -> Signer:
    data = path.read_bytes()
    first, _, pem = data.partition(b"\n")
    prefix = b"# opensense audit signing key: "
    if not first.startswith(prefix):
        raise NoteError(f"{path} is not an opensense audit signing key")
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise NoteError(f"{path} does not hold an Ed25519 key")
    return Signer(first[len(prefix) :].decode().strip(), key)
