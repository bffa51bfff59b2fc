"""Encrypted logical backups: pg_dump streamed through age (pyrage) to recipients
whose private keys are not on this host; rotation; restore; the restore test.
docs/backups.md."""
