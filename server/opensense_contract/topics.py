"""MQTT topics and the device ACL, as pure functions (no I/O; tested alone).

Layout, the same on the server's broker and a site gateway's:
opensense/<account id>/<device local_id>
  …                 measurements (QoS 1), published by the device
  …/lwt             retained "online"/"offline" (the device's will), by the device
  …/info            retained JSON (fw version, model, reset cause), by the device
  …/err             error envelopes for rejected payloads, by the server
  …/cmd/identify    blink the LED, by the server
  …/cmd/cadence     new cadence in seconds, by the server

A device publishes only its own measurements, lwt and info, and subscribes only to
its own cmd/# and err. local_id never holds '/', '+' or '#' (the API refuses them),
so a device's prefix is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

ROOT = "opensense"
DEVICE_PUBLISHES = ("", "lwt", "info")  # "" = the measurements topic itself
COMMANDS = ("identify", "cadence")
# cmd/cadence (and a node's config): whole seconds between readings, 10 s to a day.
# The server's API holds a device's cadence_s to the same range, so every cadence it
# sends is one a node takes.
CADENCE_MIN_S = 10
CADENCE_MAX_S = 86400
LWT = "lwt"
INFO = "info"
ERR = "err"
CMD = "cmd"
LWT_ONLINE = "online"
LWT_OFFLINE = "offline"
MEASUREMENT_QOS = 1  # QoS 0 measurements are dropped (docs/mqtt.md)


@dataclass(frozen=True)
class DeviceTopic:
    account: str
    device: str  # local_id
    sub: str  # "" for measurements, "lwt", "info", "err", "cmd/identify", …


def prefix(account: str, device: str) -> str:
    return f"{ROOT}/{account}/{device}"


def topic(account: str, device: str, sub: str = "") -> str:
    return prefix(account, device) + (f"/{sub}" if sub else "")


def parse(name: str) -> DeviceTopic | None:
    parts = name.split("/")
    if len(parts) < 3 or parts[0] != ROOT or not parts[1] or not parts[2]:
        return None
    return DeviceTopic(parts[1], parts[2], "/".join(parts[3:]))


def measurement_device(name: str, account: str) -> str | None:
    """The node's local_id from a measurement topic opensense/<account>/<local_id>,
    or None for any other topic (a site broker's ACL lets a node publish only under
    its own name, so the name is the node's)."""
    parts = name.split("/")
    if len(parts) == 3 and parts[0] == ROOT and parts[1] == account and parts[2]:
        return parts[2]
    return None


def publish_refusal(account: str, device: str, name: str) -> str | None:
    """None if the device may publish to `name`, else the reason it may not."""
    t = parse(name)
    if t is None or (t.account, t.device) != (account, device):
        return f"{name!r} is not under this device's topic {prefix(account, device)}"
    if t.sub not in DEVICE_PUBLISHES:
        return f"a device publishes only measurements, lwt and info, not {t.sub!r}"
    return None


def subscribe_refusal(account: str, device: str, topic_filter: str) -> str | None:
    """None if the device may subscribe to `topic_filter`, else the reason."""
    own = prefix(account, device).split("/")
    levels = topic_filter.split("/")
    if levels[:3] != own:
        return f"{topic_filter!r} reaches beyond this device's topic {prefix(account, device)}"
    rest = levels[3:]
    if rest == [ERR]:
        return None
    if (
        len(rest) >= 2
        and rest[0] == CMD
        and (rest[1:] in (["#"], ["+"]) or (len(rest) == 2 and rest[1] in COMMANDS))
    ):
        return None
    if rest == [CMD, "#"] or rest == [CMD]:
        return None
    return f"a device subscribes only to its own cmd/# and err, not {topic_filter!r}"


def mosquitto_acl(account: str, logins: list[tuple[str, str]], gw_user: str) -> str:
    """A site gateway's Mosquitto ACL. A node logs in with its `dev_` id (the one
    login convention of both brokers) while its topics are named by its `local_id`,
    so each node gets a `user` block (`logins`: (dev_ id, local_id) pairs) rather than
    a `%u` pattern: it writes only its own measurements, lwt and info and reads its
    own cmd/# and err (the firmware subscribes to both; a denied subscription fails
    its connect); the gateway reads them all. The same ACL as the server's, in
    Mosquitto's words."""
    lines = ["# written by opensense-gateway from the server's sync; do not edit"]
    for login, local_id in logins:
        root = prefix(account, local_id)
        lines += ["", f"user {login}"]
        lines += [f"topic write {root}" + (f"/{sub}" if sub else "") for sub in DEVICE_PUBLISHES]
        lines += [f"topic read {root}/{CMD}/#", f"topic read {root}/{ERR}"]
    lines += ["", f"user {gw_user}", f"topic read {ROOT}/{account}/#"]
    return "\n".join(lines) + "\n"
