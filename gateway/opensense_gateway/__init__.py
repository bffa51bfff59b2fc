"""OpenSense site gateway: store-and-forward for a whole site (docs/gateway.md)."""

__version__ = "0.1.0"
