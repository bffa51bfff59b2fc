"""Storage: readings, rollups, compaction of closed days, retention."""
