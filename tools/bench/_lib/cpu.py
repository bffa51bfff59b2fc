"""Who used the machine's cores during a phase: CPU seconds per role (a role: some
processes and their children), this process, and the rest of the machine. The
benches share the cores with the server, PostgreSQL and the load: a busy "rest of
machine" means other work was running and the figures are low."""

from __future__ import annotations

import time
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class CpuUse:
    wall: float
    roles: dict[str, float]  # role -> CPU seconds, this process last
    machine: float

    def of(self, role: str) -> float:
        return self.roles.get(role, 0.0)

    @property
    def rest(self) -> float:
        """CPU seconds of everything else on the machine."""
        return max(0.0, self.machine - sum(self.roles.values()))

    def line(self) -> str:
        w = max(self.wall, 1e-9)
        parts = [f"{role} {sec / w:.2f}" for role, sec in self.roles.items()]
        parts.append(f"rest of machine {self.rest / w:.2f}")
        return f"CPU, cores busy of {psutil.cpu_count()}: " + ", ".join(parts)


def process_cpu(pid: int | None) -> float | None:
    """CPU seconds of one process (None: no pid, or not on this machine)."""
    if pid is None:
        return None
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return float(t.user + t.system)


def _tree_cpu(pids: list[int], skip: frozenset[int] = frozenset()) -> dict[int, float]:
    """CPU seconds so far of `pids` and their descendants, by pid; those in `skip`
    (a process another role names itself) left out."""
    out: dict[int, float] = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for p in procs:
            if p.pid in skip:
                continue
            try:
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
            except psutil.Error:
                pass
    return out


class CpuMeter:
    """CPU seconds per role and of this process (as `me`) between start() and stop().
    A role whose pid is None is left out (PostgreSQL on another machine). A role is its
    processes and their descendants, except a descendant that another role names
    itself (the bench's own PostgreSQL backend is not PostgreSQL's work for the
    server). `by_pid` holds the last window's CPU seconds per process of each role."""

    def __init__(self, roles: dict[str, int | None] | None = None, me: str = "bench") -> None:
        self.me = me
        self._roles: dict[str, list[int]] = {}
        self._fixed = {r: [p] for r, p in (roles or {}).items() if p}
        self._start: tuple[float, dict[str, dict[int, float]], float] | None = None
        self.by_pid: dict[str, dict[int, float]] = {}

    def _skip(self, role: str) -> frozenset[int]:
        mine = set(self._roles[role])
        return frozenset(p for r, ps in self._roles.items() for p in ps if p not in mine)

    def start(self, roles: dict[str, list[int]] | None = None) -> None:
        self._roles = {**self._fixed, **(roles or {})}
        psutil.cpu_percent(interval=None)  # resets the system-wide counter
        me = psutil.Process().cpu_times()
        before = {r: _tree_cpu(p, self._skip(r)) for r, p in self._roles.items()}
        self._start = (time.perf_counter(), before, me.user + me.system)

    def stop(self) -> CpuUse:
        assert self._start is not None
        t0, before, me0 = self._start
        wall = time.perf_counter() - t0
        machine = psutil.cpu_percent(interval=None) / 100 * (psutil.cpu_count() or 1) * wall
        me = psutil.Process().cpu_times()
        out: dict[str, float] = {}
        self.by_pid = {}
        for role, pids in self._roles.items():
            after = _tree_cpu(pids, self._skip(role))
            per = {pid: max(0.0, v - before[role].get(pid, 0.0)) for pid, v in after.items()}
            self.by_pid[role] = per
            out[role] = sum(per.values())
        out[self.me] = me.user + me.system - me0
        return CpuUse(wall, out, machine)
