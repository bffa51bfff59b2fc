"""Flash-queue benchmark: the node firmware's queue (firmware/sense/fq.py) under the
real micropython on littlefs over a RAM flash chip with the ESP32's geometry.

Prints, per simulated day at one reading a minute from 3 probes plus a health record
every 15 minutes: block erases and program/erase operations with the uplink down,
batch=1 (every record its own append: the baseline) against batch=5 (the default),
and with the uplink up; the bytes a sampling tick takes on flash, how many days of
outage the default 1.6 MB queue holds, and how long draining it takes on this host.
`--quick` simulates a quarter day and a 3-day fill.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from _lib.procs import ROOT
from _lib.report import ratio, say


def main() -> int:
    mp = Path(sys.executable).with_name("micropython")
    env = dict(os.environ, MICROPYPATH=f".frozen:{ROOT / 'firmware'}")
    r = subprocess.run(
        [str(mp), "-X", "heapsize=6m", str(ROOT / "tools/bench/fwqueue_mp.py"), *sys.argv[1:]],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=1800,
    )
    if r.returncode != 0:
        print(r.stdout, r.stderr, file=sys.stderr)
        return 1
    f = dict(line.split("=", 1) for line in r.stdout.split() if "=" in line)
    b1, b5 = float(f["offline_batch1_erases_per_day"]), float(f["offline_batch5_erases_per_day"])
    say("node flash queue (littlefs, 4 KiB blocks, 2 MiB partition; 3 probes at 1/min)")
    say(f"  erases/day, uplink down, batch=1 (baseline): {b1:8.0f}")
    say(
        f"  erases/day, uplink down, batch=5 (default):  {b5:8.0f}   ratio {ratio(b5, max(b1, 1)):.2f}"
    )
    say(
        f"  flash ops/day (programs+erases), batch=5:    {float(f['offline_batch5_flash_ops_per_day']):8.0f}"
    )
    say(f"  erases/day, uplink up (acked from RAM):      {float(f['online_erases_per_day']):8.0f}")
    say(
        f"  per block (512 blocks, littlefs wear-levels): {b5 / 512:8.2f} erases/day -> "
        f"{100000 / max(b5 / 512, 1e-9) / 365:.0f} years to 100k cycles"
    )
    say(f"  bytes on flash per sampling tick:             {float(f['bytes_per_tick']):8.1f}")
    say(f"  outage the 1.6 MB queue holds:                {float(f['capacity_days']):8.1f} days")
    say(f"  littlefs free when the queue is full:         {int(f['fs_free_bytes']) // 1024:8d} KiB")
    say(
        f"  drain of {f['drain_records']} records on this host: {f['drain_ms_host']} ms "
        "(an ESP32 is slower; the uplink, not the flash, bounds replay)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
