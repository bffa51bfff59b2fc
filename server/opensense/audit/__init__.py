"""Tamper-evident audit trail: append-only rows, a SHA-256 hash chain per account,
the same rows as leaves of an RFC 6962 Merkle tree per account, and signed C2SP
checkpoints published outside the database (docs/audit.md)."""

from .trail import Row, record

__all__ = ["Row", "record"]
