"""Installer tools for the node firmware (firmware/): pinned dependencies, config
validation, the install plan and `opensense node flash`."""
