"""Prefixed identifiers: the type of a thing is readable from its id."""

from __future__ import annotations

import base64
import secrets

PREFIXES = (
    "acc",
    "site",
    "dev",
    "snr",
    "chn",
    "rul",
    "evt",
    "rpt",
    "tok",
    "req",
    "inc",
    "tgt",
    "sil",
    "dlv",
    "gw",
    "usr",
)


def new_id(prefix: str) -> str:
    """prefix_ + 16 base32 characters (80 random bits)."""
    assert prefix in PREFIXES, prefix
    return prefix + "_" + base64.b32encode(secrets.token_bytes(10)).decode().lower()
