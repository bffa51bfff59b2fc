"""The wire contract between the OpenSense server, the site gateway and the node
firmware, as data and pure functions: standard library only, no I/O.

The server (`server/opensense`) and the gateway (`gateway/opensense_gateway`) import
it; the gateway's distribution ships the same files (`gateway/opensense_contract` is
a link to this folder). The firmware cannot import a CPython package, so
`tools/gen_firmware_contract.py` writes the constants it needs into
`firmware/sense/contract.py`, and a test fails when that file is stale.

Modules:
- `rules`: rule kinds, their parameters and defaults, and which kinds a gateway runs.
"""
