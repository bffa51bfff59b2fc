"""The gateway's one config file (INI). Every key, its default and its meaning are
listed here and in docs/gateway.md; `opensense-gateway --print-config` shows them."""

from __future__ import annotations

import configparser
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class Config:
    # [gateway]
    state_dir: str = "/var/lib/opensense-gateway"  # queue.sqlite3 lives here
    # [server]
    server_url: str = ""  # https://opensense.example (the server's base URL)
    server_token: str = ""  # gw_… from `opensense gateway create`
    server_ca_file: str = ""  # PEM to verify the server with ("" = system CAs)
    server_timeout_s: float = 30.0
    # [forward]
    batch_size: int = 2000  # readings per POST /v1/gateway/ingest (server max 5000)
    max_rate: float = 10000.0  # readings/s at most while draining a backlog
    sync_interval_s: float = 300.0  # devices, token hashes, rules
    # the sync long-poll: the server answers as soon as the site's devices, tokens or
    # rules change (a rotated token stops working at the site at once); 0 = off
    sync_wait_s: float = 25.0
    health_interval_s: float = 60.0
    # [mqtt] the site broker ("" host: no MQTT intake)
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    mqtt_username: str = "opensense-gateway"
    mqtt_password: str = ""
    mqtt_client_id: str = "opensense-gateway"
    mqtt_password_file: str = ""  # written from the synced hashes ("" = do not manage)
    mqtt_acl_file: str = ""
    mqtt_reload_command: str = ""  # e.g. "systemctl reload mosquitto"
    # [http] local POST /v1/ingest for nodes that can only POST ("" = off)
    http_listen: str = ""  # host:port, or a bare port (= 127.0.0.1:port)
    http_cert_file: str = ""  # PEM certificate chain: the door speaks TLS (1.2+)
    http_key_file: str = ""  # its private key
    # a non-loopback address without TLS is refused at start (tokens would cross the
    # LAN in clear) unless this says so on purpose
    http_plaintext: bool = False
    # [alarms]
    uplink_down_after_s: float = 600.0  # warn locally once the server is out this long
    check_interval_s: float = 5.0
    smtp_host: str = ""
    smtp_port: int = 25
    smtp_from: str = "opensense-gateway@localhost"
    smtp_to: str = ""  # comma-separated
    hook: str = ""  # shell command; the alert is in OPENSENSE_* environment variables
    gpio_pin: int = -1  # a buzzer on a Raspberry Pi (sysfs GPIO); -1 = none

    @property
    def queue_path(self) -> Path:
        return Path(self.state_dir) / "queue.sqlite3"


SECTIONS = {
    "gateway": ("state_dir",),
    "server": ("server_url", "server_token", "server_ca_file", "server_timeout_s"),
    "forward": ("batch_size", "max_rate", "sync_interval_s", "sync_wait_s", "health_interval_s"),
    "mqtt": (
        "mqtt_host",
        "mqtt_port",
        "mqtt_username",
        "mqtt_password",
        "mqtt_client_id",
        "mqtt_password_file",
        "mqtt_acl_file",
        "mqtt_reload_command",
    ),
    "http": ("http_listen", "http_cert_file", "http_key_file", "http_plaintext"),
    "alarms": (
        "uplink_down_after_s",
        "check_interval_s",
        "smtp_host",
        "smtp_port",
        "smtp_from",
        "smtp_to",
        "hook",
        "gpio_pin",
    ),
}


def _key(section: str, name: str) -> str:
    """The key inside its section: `server_url` is `url` in [server]."""
    prefix = section + "_"
    return name[len(prefix) :] if name.startswith(prefix) else name


def load(path: Path) -> Config:
    cp = configparser.ConfigParser(interpolation=None)
    if not cp.read(path):
        raise SystemExit(f"opensense-gateway: cannot read config file {path}")
    types = {f.name: f.type for f in fields(Config)}
    values: dict[str, object] = {}
    known = {sec: {_key(sec, n): n for n in names} for sec, names in SECTIONS.items()}
    for sec in cp.sections():
        if sec not in known:
            raise SystemExit(f"opensense-gateway: unknown section [{sec}] in {path}")
        for k, raw in cp.items(sec):
            name = known[sec].get(k)
            if name is None:
                raise SystemExit(f"opensense-gateway: unknown key {k!r} in [{sec}] of {path}")
            t = types[name]
            try:
                if t == "bool":
                    values[name] = cp.getboolean(sec, k)
                else:
                    values[name] = float(raw) if t == "float" else int(raw) if t == "int" else raw
            except ValueError:
                raise SystemExit(f"opensense-gateway: [{sec}] {k} must be a {t}") from None
    cfg = Config(**values)  # type: ignore[arg-type]
    if not cfg.server_url or not cfg.server_token.startswith("gw_"):
        raise SystemExit("opensense-gateway: [server] url and token (gw_…) are required")
    if cfg.http_listen:
        http_address(cfg)  # a bad [http] section stops the start, not the first request
    return cfg


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def http_address(cfg: Config) -> tuple[str, int, bool]:
    """(host, port, tls) of the local HTTP door. A bare port binds loopback; any
    other address needs TLS (cert_file and key_file) or `plaintext = yes`."""
    host, sep, port = cfg.http_listen.rpartition(":")
    host = host.strip("[]") if sep else ""
    try:
        number = int(port)
    except ValueError:
        raise SystemExit(
            f"opensense-gateway: [http] listen {cfg.http_listen!r}: host:port"
        ) from None
    if not 0 < number < 65536:
        raise SystemExit(f"opensense-gateway: [http] listen port {number} is out of range")
    tls = bool(cfg.http_cert_file or cfg.http_key_file)
    if tls and not (cfg.http_cert_file and cfg.http_key_file):
        raise SystemExit("opensense-gateway: [http] cert_file and key_file go together")
    host = host or "127.0.0.1"
    if host not in LOOPBACK and not tls and not cfg.http_plaintext:
        raise SystemExit(
            f"opensense-gateway: [http] listen {cfg.http_listen!r} is reachable from the LAN:"
            " set cert_file and key_file (TLS), or plaintext = yes to send node tokens in clear"
        )
    return host, number, tls


def example() -> str:
    """A config file with every key at its default."""
    cfg = Config()
    lines = []
    for sec, names in SECTIONS.items():
        lines.append(f"[{sec}]")
        lines += [f"{_key(sec, n)} = {getattr(cfg, n)}" for n in names]
        lines.append("")
    return "\n".join(lines)
