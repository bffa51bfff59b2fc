"""HTTP plumbing shared by every feature: keys, the error translator, auth helpers."""
