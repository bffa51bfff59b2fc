"""What the benchmarks under tools/bench share.

Each bench (tools/bench/<name> launcher + <name>.py) is a short script that states
its method and measures; the machinery is here:

- `report`: printing, nearest-rank percentiles, PASS/MISS and ratios to a baseline
  measured in the same run;
- `procs`: free ports, `opensense serve` and other child processes, their logs;
- `pg`: the database (embedded PostgreSQL in a temporary directory, or a DSN given),
  scratch databases, the app role the server serves as;
- `cpu`: who used the machine's cores during a phase;
- `profile`: where a process's CPU goes: py-spy on the server and perf on
  PostgreSQL, summarised by function group (the ingest bench's --profile);
- `http_load`: the HTTP ingest load client (node-like devices, closed and open loop);
- `mqtt_load` and `mqtt_worker`: the MQTT publishers and subscriber (processes of
  their own), the bench's side of them, and counting what the server committed;
- `fleet_worker`: the fleet bench's publishers, device connections on a fixed schedule;
- `publisher`: the paho QoS 1 publisher both workers' clients are (publish -> PUBACK);
- `brokers`: a broker of the bench's own (amqtt, Mosquitto) and Mosquitto as shipped;
- `fleet`: accounts, sites, devices and tokens made through the server's service
  layer (and the MQTT fleet made through its API), the one place the benches reach
  into the server to set up data;
- `runner`: the frame every bench runs in (work directory, database, Ctrl-C/SIGTERM,
  exit status).

The benches run as scripts (`python tools/bench/<name>.py`), so `tools/bench` is on
sys.path and this package imports as `_lib`.
"""
