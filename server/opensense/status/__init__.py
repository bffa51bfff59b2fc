"""Status page, health registry, self-watching, incidents and Prometheus metrics
(docs/status.md)."""
