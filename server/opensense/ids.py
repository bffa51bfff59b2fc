"""Prefixed identifiers: the type of a thing is readable from its id."""

from __future__ import annotations

import secrets

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case

PREFIXES = ("acc", "site", "dev", "snr", "chn", "rul", "evt", "rpt", "tok", "req")


def new_id(prefix: str, length: int = 16) -> str:
    assert prefix in PREFIXES, prefix
    return prefix + "_" + "".join(secrets.choice(_ALPHABET) for _ in range(length))


def has_prefix(value: str, prefix: str) -> bool:
    return value.startswith(prefix + "_") and len(value) > len(prefix) + 1
