"""Flash-queue benchmark: the node firmware's queue (firmware/sense/fq.py) under the
real micropython on littlefs over a RAM flash chip with the ESP32's geometry.

Prints, per simulated day at one reading a minute from 3 probes plus a health record
every 15 minutes: block erases and program/erase operations with the uplink down,
batch=1 (every record its own append: the baseline) against batch=5 (the default),
and with the uplink up; the bytes a sampling tick takes on flash, how many days of
outage a 1.6 MB queue holds, and how long draining it takes on this host.
`--quick` simulates a quarter day and a 3-day fill.

Then, for 1, 3 and 8 probes, the days of outage the queue holds beside the installed
firmware: the files `opensense node flash` copies (opensense.node.flash.plan) put on a
fresh 2 MiB littlefs first, the queue bounded only by the free blocks and its reserve.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _lib.procs import ROOT
from _lib.report import ratio, say


def install_list(tmp: Path) -> Path:
    """What `opensense node flash` copies (.mpy modules), as "<host path> <chip path>"
    lines; the config and CA are stand-ins of their usual size."""
    from opensense.node.deps import ensure
    from opensense.node.flash import compile_mpy, plan

    cfg, ca = tmp / "config.json", tmp / "ca.der"
    cfg.write_bytes(b" " * 900)
    ca.write_bytes(b"\0" * 500)
    out = tmp / "install.txt"
    copies, _ = compile_mpy(plan(cfg, ca, ensure()), tmp / "chip")  # as the installer ships
    out.write_text("".join(f"{c.src} {c.dest}\n" for c in copies))
    return out


def main() -> int:
    mp = Path(sys.executable).with_name("micropython")
    env = dict(os.environ, MICROPYPATH=f".frozen:{ROOT / 'firmware'}")
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run(
            [
                str(mp),
                "-X",
                "heapsize=6m",
                str(ROOT / "tools/bench/fwqueue_mp.py"),
                *sys.argv[1:],
                "--install",
                str(install_list(Path(tmp))),
            ],
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
    print(
        f"with the installed firmware ({int(f['footprint_bytes']) // 1024} KiB in files,"
        f" {f['free_blocks_after_install']} blocks free after it) on a 2 MiB littlefs,"
        " the queue bounded by the free blocks less a 32-block reserve:"
    )
    for n in (1, 3, 8):
        print(
            f"  {n} probe{'s' if n > 1 else ' '}: {int(f[f'probes{n}_capacity_bytes']) // 1024:5d} KiB"
            f" queue, {int(f[f'probes{n}_bytes_per_day']):6d} B a day:"
            f" {float(f[f'probes{n}_days']):6.1f} days of outage"
            + ("" if f[f"probes{n}_filled"] == "1" else " (extrapolated: --quick)")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
