"""The wire contract between the OpenSense server, the site gateway and the node
firmware, as data and pure functions: standard library only, no I/O.

The server (`server/opensense`) and the gateway (`gateway/opensense_gateway`) import
it; the gateway's distribution ships the same files (`gateway/opensense_contract` is
a link to this folder). The firmware cannot import a CPython package, so
`tools/gen_firmware_contract.py` writes the constants it needs into
`firmware/sense/contract.py`, and a test fails when that file is stale.

Modules:
- `payload`: the ingest payload's keys and limits, value and timestamp rules.
- `strictjson`: the one strict JSON reader of every door (NaN, depth, NUL, surrogates).
- `topics`: the MQTT topic layout and the device ACL (server broker and site broker).
- `retry`: when a client sends again (backoff, Retry-After, never).
- `errors`: the envelope's error codes and their HTTP statuses; `WireError`.
- `rules`: rule kinds, their parameters and defaults, and which kinds a gateway runs.
"""
