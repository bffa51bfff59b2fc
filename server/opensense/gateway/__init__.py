"""Site gateways: the server side of store-and-forward (issue 5; docs/gateway.md)."""
