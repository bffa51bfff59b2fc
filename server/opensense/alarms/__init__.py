"""Alarms: the rule engine, events, escalation and notifications (docs/alarms.md)."""
