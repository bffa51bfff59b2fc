"""Every server setting, declared once as data.

Each setting is read from the environment variable named here; `docs/settings.md`
lists them all (a test holds the docs to this table). Retention settings carry a
minimum: the seed architecture forbids shortening retention, so a lower value is
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
        "PostgreSQL DSN. Empty: start the embedded server in <state_dir>/pgdata.",
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
        "pool_max", "OPENSENSE_POOL_MAX", int, 10, "Database pool: most connections.", minimum=1
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
        "retention_raw_months",
        "OPENSENSE_RETENTION_RAW_MONTHS",
        int,
        13,
        "Months of raw measurements kept (seed minimum 13).",
        minimum=13,
    ),
    Setting(
        "retention_rollup_months",
        "OPENSENSE_RETENTION_ROLLUP_MONTHS",
        int,
        60,
        "Months of 5-minute and 1-hour rollups kept (seed minimum 60); 1-day rollups are kept forever.",
        minimum=60,
    ),
    Setting(
        "retention_request_log_days",
        "OPENSENSE_RETENTION_REQUEST_LOG_DAYS",
        int,
        30,
        "Days of API request log kept (seed minimum 30).",
        minimum=30,
    ),
    Setting(
        "jobs_enabled",
        "OPENSENSE_JOBS",
        bool,
        True,
        "Run scheduled jobs (partitions, compaction, retention) in this process. "
        "Safe in every process: each job run is claimed in the database.",
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
        "Names and addresses the generated broker certificate is valid for (comma-separated).",
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
        "gateway_batch_max",
        "OPENSENSE_GATEWAY_BATCH_MAX",
        int,
        5000,
        "Readings a site gateway may forward in one POST /v1/gateway/ingest batch.",
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
    host: str = "127.0.0.1"
    port: int = 8080
    bcrypt_rounds: int = 12
    ingest_rate_per_min: int = 60
    read_rate_per_min: int = 120
    export_interval_s: int = 300
    pool_min: int = 2
    pool_max: int = 10
    compact_after_days: int = 3
    retention_raw_months: int = 13
    retention_rollup_months: int = 60
    retention_request_log_days: int = 30
    jobs_enabled: bool = True
    log_level: str = "INFO"
    mqtt: str = "embedded"
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 8883
    mqtt_hostnames: str = "localhost,127.0.0.1"
    mqtt_url: str = ""
    mqtt_ca: str = ""
    emqx_secret: str = ""
    gateway_batch_max: int = 5000
    # Not a setting: the clock. Tests inject one; everything time-dependent asks it.
    clock: Callable[[], datetime] = field(default=_utcnow, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.mqtt not in ("embedded", "external", "off"):
            raise ValueError(f"OPENSENSE_MQTT must be embedded, external or off, not {self.mqtt!r}")
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
        return cls(**values)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def _check_table_matches_config() -> None:
    names = {f.name for f in dataclasses.fields(Config)} - {"clock"}
    declared = {s.name for s in SETTINGS}
    assert names == declared, f"Config fields and SETTINGS differ: {names ^ declared}"
    for s in SETTINGS:
        default = Config.__dataclass_fields__[s.name].default
        assert default == (s.kind(s.default) if s.kind is not bool else s.default), s.name


_check_table_matches_config()
