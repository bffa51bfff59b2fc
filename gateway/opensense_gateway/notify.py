"""Local alert paths, used only while the server is unreachable: an SMTP relay on
the LAN, a shell hook, a GPIO buzzer. Each path returns normally when the alert left,
and raises when it did not (the alarm loop tries again on its next round)."""

from __future__ import annotations

import os
import smtplib
import subprocess
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from .config import Config


def _iso(t: float | None) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds") if t else ""


def text(alarm: dict[str, Any], what: str) -> tuple[str, str]:
    ch = f"{alarm['device']} {alarm['kind']} {alarm['label']}".strip()
    subject = f"[ALARM] {ch}" if what == "open" else f"[CLEARED] {ch}"
    body = (
        f"{'Alarm' if what == 'open' else 'Cleared'} on {ch}, raised by the site gateway while "
        f"the OpenSense server is unreachable.\n\n"
        f"since: {_iso(alarm.get('opened_at'))}\n"
        + (f"cleared: {_iso(alarm['cleared_at'])}\n" if alarm.get("cleared_at") else "")
        + f"value: {alarm.get('value')}\nrule: {alarm.get('rule_id')}\n\n"
        "The server takes over as soon as the line is back.\n"
    )
    return subject, body


def paths(cfg: Config) -> list[str]:
    out = []
    if cfg.smtp_host and cfg.smtp_to:
        out.append("smtp")
    if cfg.hook:
        out.append("hook")
    if cfg.gpio_pin >= 0:
        out.append("gpio")
    return out


def send(cfg: Config, path: str, alarm: dict[str, Any], what: str) -> None:
    subject, body = text(alarm, what)
    if path == "smtp":
        msg = EmailMessage()
        msg["Subject"] = subject
        msg["From"] = cfg.smtp_from
        msg["To"] = cfg.smtp_to
        msg.set_content(body)
        with smtplib.SMTP(cfg.smtp_host, cfg.smtp_port, timeout=20) as s:
            s.send_message(msg)
    elif path == "hook":
        env = dict(
            os.environ,
            OPENSENSE_ALERT=what,
            OPENSENSE_DEVICE=str(alarm["device"]),
            OPENSENSE_KIND=str(alarm["kind"]),
            OPENSENSE_LABEL=str(alarm["label"]),
            OPENSENSE_VALUE=str(alarm.get("value")),
            OPENSENSE_OPENED_AT=_iso(alarm.get("opened_at")),
            OPENSENSE_SUBJECT=subject,
        )
        subprocess.run(cfg.hook, shell=True, env=env, check=True, timeout=60)
    elif path == "gpio":
        # sysfs GPIO (Raspberry Pi OS): export once, drive high for an open alarm
        base = Path("/sys/class/gpio")
        pin = base / f"gpio{cfg.gpio_pin}"
        if not pin.exists():
            (base / "export").write_text(str(cfg.gpio_pin))
            (pin / "direction").write_text("out")
        (pin / "value").write_text("1" if what == "open" else "0")
    else:
        raise ValueError(path)
