"""Ingest: the doors a reading comes in by (HTTP JSON, Shelly GET, LoRaWAN webhook)."""
