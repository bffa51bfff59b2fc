"""Scheduled jobs. Any number of server processes may run the scheduler: a run is
claimed by one UPDATE that moves `next_run_at` forward, so each run happens once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from . import aio, db
from .api.keys import CONFIG, POOL
from .settings import Config
from .storage import rollups
from .storage.compaction import compact
from .web import store as web_store

log = logging.getLogger(__name__)

JobFn = Callable[[AsyncConnection[Any], Config, datetime], Awaitable[str]]


@dataclass(frozen=True)
class Job:
    name: str
    every: timedelta
    run: JobFn
    doc: str
    every_setting: str | None = None  # a Config field (seconds) that overrides `every`

    def interval(self, cfg: Config) -> timedelta:
        if self.every_setting:
            return timedelta(seconds=getattr(cfg, self.every_setting))
        return self.every


async def _partitions(conn: AsyncConnection[Any], cfg: Config, now: datetime) -> str:
    def sync() -> int:
        import psycopg

        with psycopg.connect(conn.info.dsn, autocommit=True) as c:
            return db.ensure_partitions(c, now, back_months=cfg.retention_raw_months)

    return f"{await asyncio.to_thread(sync)} partitions created"


async def _compaction(conn: AsyncConnection[Any], cfg: Config, now: datetime) -> str:
    return f"{await compact(conn, now, cfg.compact_after_days)} readings packed"


async def _rollups(conn: AsyncConnection[Any], cfg: Config, now: datetime) -> str:
    return await rollups.materialize(conn, now)


async def _retention(conn: AsyncConnection[Any], cfg: Config, now: datetime) -> str:
    from . import retention

    return await retention.run(conn, cfg, now)


class AuditBroken(RuntimeError):
    """The audit trail failed verification (the status page's P0 audit_integrity)."""


async def _verify_audit(conn: AsyncConnection[Any], cfg: Config) -> str:
    """The whole verification of `opensense audit verify` (chains, trees, published
    checkpoints); raises AuditBroken naming every problem."""
    from .audit import store, verify
    from .audit.publish import AuditPlaces

    places = AuditPlaces.from_config(cfg)
    directory = store.Directory(places.publish_dir)
    # the pinned key, never the publish directory's verifier.key (verify reports
    # published checkpoints it has no key for)
    rep = await verify.verify(conn, directory, places.verifier())
    if not rep.ok:
        raise AuditBroken(f"{len(rep.problems)} problem(s): " + "; ".join(rep.problems))
    return (
        f"{rep.rows} rows in {rep.accounts} account(s) verified, "
        f"{rep.checkpoints} signed checkpoint(s) match"
    )


async def _audit_verify(conn: AsyncConnection[Any], cfg: Config, now: datetime) -> str:
    return await _verify_audit(conn, cfg)


async def _audit_checkpoint(conn: AsyncConnection[Any], cfg: Config, now: datetime) -> str:
    """Every few minutes: sign each account whose trail grew, so rows deleted behind
    the trigger's back are missed by a signed checkpoint for minutes, not a day.
    Cheap when nothing moved (row counts against the latest checkpoint files)."""
    from .audit.publish import AuditPlaces, moved, publish

    places = AuditPlaces.from_config(cfg)
    grew, same = await moved(conn, places)
    if not grew:
        cur = await conn.execute(
            "SELECT last_status, last_detail FROM jobs WHERE name = 'audit_verify'"
        )
        last = await cur.fetchone()
        if last is not None and last[0] == "failed":  # never report a broken trail as fine
            raise AuditBroken(f"the last audit_verify failed: {last[1]}")
        return "; ".join(f"{acc}: unchanged at {n}" for acc, n in same) or "no audit rows yet"
    places.signer()  # a missing key fails here, before the verification's cost
    # never sign a tree over a rewritten row: verify first
    await _verify_audit(conn, cfg)
    return "; ".join(await publish(conn, places)) or "no audit rows yet"


def _dsn_of(conn: AsyncConnection[Any], cfg: Config) -> str:
    # conn.info.dsn has no password: the configured URL has, and the embedded server needs none
    return cfg.database_url or conn.info.dsn


async def _backup(conn: AsyncConnection[Any], cfg: Config, now: datetime) -> str:
    from .backup.run import run_backup

    if not cfg.backup_recipients:
        return "skipped: OPENSENSE_BACKUP_RECIPIENTS is not set (docs/backups.md)"
    return "; ".join(await asyncio.to_thread(run_backup, cfg, _dsn_of(conn, cfg)))


async def _restore_test(conn: AsyncConnection[Any], cfg: Config, now: datetime) -> str:
    from .backup.run import restore_test

    line = await asyncio.to_thread(restore_test, cfg, _dsn_of(conn, cfg))
    if line.startswith("FAILED: "):  # recorded in backup_runs; the job shows it too
        raise RuntimeError(line)
    return line.removeprefix("ok: ")


async def _housekeeping(conn: AsyncConnection[Any], cfg: Config, now: datetime) -> str:
    a = await conn.execute(
        "DELETE FROM rate_counters WHERE window_start < %s", (now - timedelta(hours=1),)
    )
    b = await conn.execute(
        "DELETE FROM idempotency_keys WHERE created_at < %s", (now - timedelta(hours=24),)
    )
    await web_store.sweep(conn, now)  # expired sign-in codes, idle dashboard sessions
    return f"swept {a.rowcount} rate windows, {b.rowcount} idempotency keys"


async def _daily_digest(conn: AsyncConnection[Any], cfg: Config, now: datetime) -> str:
    from .alarms import digest

    return await digest.run(conn, cfg, now)


async def _report_schedule(conn: AsyncConnection[Any], cfg: Config, now: datetime) -> str:
    from .reports import schedule

    return await schedule.run(conn, cfg, now)


JOBS: tuple[Job, ...] = (
    Job("partitions", timedelta(hours=6), _partitions, "create monthly partitions ahead of time"),
    Job(
        "rollups",
        timedelta(minutes=1),
        _rollups,
        "materialise the rollup buckets that closed 5 minutes ago; recompute late ranges",
    ),
    Job("compaction", timedelta(hours=1), _compaction, "pack closed days"),
    Job(
        "retention", timedelta(hours=24), _retention, "drop partitions and log rows past retention"
    ),
    Job(
        "audit_checkpoint",
        timedelta(minutes=5),
        _audit_checkpoint,
        "when a trail grew: verify, then sign and publish each account's audit checkpoint",
        every_setting="audit_checkpoint_interval_s",
    ),
    Job(
        "audit_verify",
        timedelta(hours=1),
        _audit_verify,
        "verify every audit chain, tree and published checkpoint (status: audit)",
    ),
    Job("backup", timedelta(hours=1), _backup, "encrypted dump, weekly copy, rotation"),
    Job(
        "restore_test",
        timedelta(hours=24),
        _restore_test,
        "restore the newest dump into a scratch database and check it",
    ),
    Job(
        "report_schedule",
        timedelta(minutes=5),
        _report_schedule,
        "queue each site's monthly report once its month closed (site time zone); "
        "email ready ones with the PDF to the site's report recipients",
    ),
    Job(
        "daily_digest",
        timedelta(minutes=5),
        _daily_digest,
        "email each confirmed email recipient the digest of the day before, once, from "
        "OPENSENSE_DAILY_DIGEST_HOUR site time (off: OPENSENSE_DAILY_DIGEST)",
    ),
    Job(
        "housekeeping",
        timedelta(minutes=10),
        _housekeeping,
        "sweep rate counters and idempotency keys",
    ),
)


async def claim(
    conn: AsyncConnection[Any], job: Job, now: datetime, every: timedelta | None = None
) -> bool:
    await conn.execute(
        "INSERT INTO jobs (name, next_run_at) VALUES (%s, %s) ON CONFLICT DO NOTHING",
        (job.name, now),
    )
    cur = await conn.execute(
        "UPDATE jobs SET next_run_at = %s, last_run_at = %s WHERE name = %s AND next_run_at <= %s RETURNING 1",
        (now + (every or job.every), now, job.name, now),
    )
    return await cur.fetchone() is not None


async def run_due(
    pool: AsyncConnectionPool, cfg: Config, jobs: tuple[Job, ...] = JOBS
) -> list[str]:
    """Run every job whose time has come and that this process claimed."""
    ran = []
    for job in jobs:
        now = cfg.clock()
        async with pool.connection() as conn:
            if not await claim(conn, job, now, job.interval(cfg)):
                continue
            try:
                detail = await job.run(conn, cfg, now)
                status = "ok"
            except Exception as exc:  # a failed job is recorded and retried next time
                log.exception("job %s failed", job.name)
                detail, status = repr(exc)[:500], "failed"
            await conn.execute(
                "UPDATE jobs SET last_status = %s, last_detail = %s WHERE name = %s",
                (status, detail, job.name),
            )
            ran.append(f"{job.name}: {status}: {detail}")
    return ran


async def scheduler(pool: AsyncConnectionPool, cfg: Config, tick: float = 30.0) -> None:
    while True:
        try:
            await run_due(pool, cfg)
        except Exception:
            log.exception("scheduler tick failed")
        await asyncio.sleep(tick)


async def jobs_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    task = asyncio.create_task(scheduler(app[POOL], cfg)) if cfg.jobs_enabled else None
    yield
    await aio.cancel(task)


def setup(app: web.Application) -> None:
    """The scheduler, in a serving process with OPENSENSE_JOBS on (the database
    decides which process runs a due job: `claim`)."""
    app.cleanup_ctx.append(jobs_ctx)
