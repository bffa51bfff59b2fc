"""OpenSense server: ingest, storage, alarms and reports for cold-chain monitoring."""

__version__ = "0.1.0"
