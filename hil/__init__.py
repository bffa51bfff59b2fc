"""The bench rig (docs/bench-rig.md)."""
