"""The public status page as HTML: server-rendered, readable without JavaScript,
one inline stylesheet, 90-day bars as plain elements with a title per day."""

from __future__ import annotations

from datetime import datetime
from html import escape
from typing import Any

from ..api.jsonutil import rfc3339

LABEL = {
    "operational": "Operational",
    "degraded": "Degraded",
    "outage": "Outage",
    "unknown": "Unknown",
    "none": "No data",
}
OVERALL = {
    "operational": "All systems operational",
    "degraded": "Some systems are degraded",
    "partial_outage": "Partial outage",
    "major_outage": "Major outage",
    "unknown": "Status unknown",
}
CSS = """
body{font:15px/1.45 system-ui,sans-serif;max-width:56rem;margin:2rem auto;padding:0 1rem;color:#222}
h1{font-size:1.4rem}.banner{padding:.8rem 1rem;border-radius:.4rem;color:#fff;font-weight:600}
.operational{background:#2e9d5b}.degraded{background:#d9a400}.outage,.major_outage,.partial_outage{background:#c9362b}
.unknown,.none{background:#9aa0a6}
.c{border-bottom:1px solid #e4e4e4;padding:.7rem 0}.c header{display:flex;justify-content:space-between}
.state{font-size:.85rem;padding:0 .5rem;border-radius:.3rem;color:#fff}
.bars{display:flex;gap:1px;margin:.35rem 0 .1rem}.bars span{flex:1;height:1.6rem;border-radius:1px}
.meta{font-size:.8rem;color:#666;display:flex;justify-content:space-between}
.inc{border-left:4px solid #c9362b;padding:.2rem .8rem;margin:1rem 0}.inc.resolved{border-color:#2e9d5b}
.inc p{margin:.3rem 0}.inc time{color:#666;font-size:.85rem}
"""


def _t(v: Any) -> str:
    if isinstance(v, datetime):
        return rfc3339(v)
    return str(v) if v is not None else ""


def render_html(snap: dict[str, Any]) -> str:
    out = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        '<meta name=viewport content="width=device-width,initial-scale=1">',
        '<meta http-equiv=refresh content="60">',
        "<title>OpenSense status</title><style>",
        CSS,
        "</style></head><body><h1>OpenSense status</h1>",
        f'<p class="banner {escape(snap["overall"])}">{escape(OVERALL[snap["overall"]])}</p>',
    ]
    if snap.get("stale"):
        out.append(
            "<p><strong>This page could not be refreshed from the database at its last"
            " update; what it shows may be out of date.</strong></p>"
        )
    live = [i for i in snap["incidents"] if i["resolved_at"] is None]
    done = [i for i in snap["incidents"] if i["resolved_at"] is not None]
    if live:
        out.append("<h2>Open incidents</h2>")
        out += [_incident(i) for i in live]
    out.append("<h2>Components</h2>")
    for c in snap["components"]:
        up = c["uptime_90d"]
        out.append(
            f'<section class=c id="{escape(c["id"])}"><header><strong>{escape(c["name"])}</strong>'
            f'<span class="state {escape(c["state"])}">{LABEL[c["state"]]}</span></header>'
            f'<div class=bars aria-label="90 days, oldest first">'
        )
        for d in c["days"]:
            tip = f"{d['day']}: {LABEL[d['state']]}"
            if d["uptime"] is not None:
                tip += f", {d['uptime'] * 100:.2f} % up"
            out.append(f'<span class="{d["state"]}" title="{escape(tip)}"></span>')
        out.append(
            f"</div><div class=meta><span>90 days ago</span><span>{escape(c['detail'])}"
            f" · {'no data' if up is None else f'{up * 100:.2f} % uptime'}</span>"
            "<span>today</span></div></section>"
        )
    if done:
        out.append("<h2>Resolved in the last 7 days</h2>")
        out += [_incident(i) for i in done]
    out.append(
        f"<p class=meta>Updated {escape(_t(snap['generated_at']))} · "
        '<a href="/status.json">JSON</a></p></body></html>'
    )
    return "".join(out)


def _incident(i: dict[str, Any]) -> str:
    cls = "inc resolved" if i["resolved_at"] else "inc"
    parts = [
        f'<article class="{cls}" id="{escape(i["id"])}"><h3>{escape(i["class"])}:'
        f" {escape(i['title'])} <small>({escape(i['status'])})</small></h3>"
    ]
    for u in reversed(i["updates"]):
        parts.append(
            f"<p><time>{escape(_t(u['at']))}</time> <strong>{escape(u['status'])}</strong>"
            f" — {escape(u['body'])}</p>"
        )
    if i.get("postmortem"):
        parts.append(
            f"<details><summary>Post-mortem</summary><p>{escape(i['postmortem'])}</p></details>"
        )
    parts.append("</article>")
    return "".join(parts)
