"""A small client of Mosquitto's dynamic-security control API.

The plugin is administered with JSON commands published to `$CONTROL/dynamic-security/v1`;
the answers come on `…/v1/response` (to every subscriber, so each command carries a
random `correlationData` and answers are matched on it). Commands sent in one message
run one after the other without any other control message in between.

What OpenSense keeps there (and nothing else: the bcrypt hash in our database cannot
become a Mosquitto password, so the broker gets the plaintext when it exists):

- one client per device: username and client id = the device's `dev_` id, password =
  its `ds_live_` token, textname `opensense device`, textdescription = the token's
  public key id (so a reconciliation can tell a stale password from the live one
  without knowing either);
- one role per device, named like the device, with the ACL of topics.py: publish its
  measurements, `lwt` and `info`; subscribe its `cmd/#` and `err`;
- the role `opensense-server`, added to the server's own (admin) account: publish
  commands and error envelopes, clear a deleted device's retained lwt/info.

Mosquitto 2.0.11 disconnects a connected client at once when its password is set
(modifyClient/setClientPassword), when it is disabled and when it is deleted, so a
rotated, revoked or deleted token also loses its live session.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from opensense_contract import topics

log = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = CONTROL_TOPIC + "/response"
DEVICE_TEXTNAME = "opensense device"
SERVER_ROLE = "opensense-server"
# At most this many commands in one message, and at most MAX_MESSAGE_BYTES of JSON:
# Mosquitto's max_packet_size in the shipped config is 64 KiB (the whole packet, topic
# and headers included), and a broker closes the connection on a bigger one.
BATCH = 50
MAX_MESSAGE_BYTES = 48 * 1024

Command = dict[str, Any]

# Errors that mean "already so": creating what exists, removing what is gone.
EXISTS = ("Client already exists", "Role already exists")
GONE = ("Client not found", "Role not found")


class DynSecError(Exception):
    """The broker answered a command with an error."""

    def __init__(self, command: str, error: str) -> None:
        super().__init__(f"dynamic security {command}: {error}")
        self.command, self.error = command, error


class DynSecUnavailable(DynSecError):
    """No answer: the broker is unreachable or the plugin is not loaded."""


def _chunks(commands: list[Command]) -> list[list[Command]]:
    """Consecutive groups of at most BATCH commands and MAX_MESSAGE_BYTES of JSON."""
    out: list[list[Command]] = []
    chunk: list[Command] = []
    size = len('{"commands": []}')
    for c in commands:
        n = len(json.dumps(c)) + 2  # with its ", " separator
        if chunk and (len(chunk) >= BATCH or size + n > MAX_MESSAGE_BYTES):
            out.append(chunk)
            chunk, size = [], len('{"commands": []}')
        chunk.append(c)
        size += n
    if chunk:
        out.append(chunk)
    return out


def _acl(acltype: str, topic: str) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "priority": 0, "allow": True}


def device_acls(account: str, local_id: str) -> list[dict[str, Any]]:
    """The device ACL of topics.py as dynamic-security ACL entries. Everything else
    falls to the default access that `mosquitto_ctrl dynsec init` sets: no publish,
    no subscribe (receiving is allowed, but only what a subscription brings)."""
    return [
        *(
            _acl("publishClientSend", topics.topic(account, local_id, sub))
            for sub in topics.DEVICE_PUBLISHES
        ),
        # a pattern: the subscription must fall inside it, so cmd/#, cmd/+ and
        # cmd/identify are allowed and opensense/# is not
        _acl("subscribePattern", topics.topic(account, local_id, f"{topics.CMD}/#")),
        _acl("subscribeLiteral", topics.topic(account, local_id, topics.ERR)),
    ]


def server_acls() -> list[dict[str, Any]]:
    """What the server publishes, besides what the `admin` role of `dynsec init`
    already gives it (subscribe and receive everything, the control topic)."""
    root = topics.ROOT
    return [
        _acl("publishClientSend", f"{root}/+/+/{topics.CMD}/#"),
        _acl("publishClientSend", f"{root}/+/+/{topics.ERR}"),
        # a deleted device's retained lwt/info are cleared with an empty retained message
        _acl("publishClientSend", f"{root}/+/+/{topics.LWT}"),
        _acl("publishClientSend", f"{root}/+/+/{topics.INFO}"),
    ]


def put_device_commands(
    device_id: str, account: str, local_id: str, token: str, key_id: str
) -> list[Command]:
    """Create or update a device's role and client, set its password and enable it.
    One message, so it lands whole: the password, the marker and the enable."""
    role = {"rolename": device_id, "acls": device_acls(account, local_id)}
    client = {
        "username": device_id,
        "clientid": device_id,
        "password": token,
        "textname": DEVICE_TEXTNAME,
        "textdescription": key_id,
        "roles": [{"rolename": device_id, "priority": 0}],
    }
    return [
        {"command": "createRole", **role},
        {"command": "modifyRole", **role},
        {"command": "createClient", **client},
        {"command": "modifyClient", **client},
        {"command": "enableClient", "username": device_id},
    ]


def remove_device_commands(device_id: str) -> list[Command]:
    return [
        {"command": "deleteClient", "username": device_id},
        {"command": "deleteRole", "rolename": device_id},
    ]


def server_role_commands() -> list[Command]:
    role = {"rolename": SERVER_ROLE, "acls": server_acls()}
    return [{"command": "createRole", **role}, {"command": "modifyRole", **role}]


# --- reconciliation -----------------------------------------------------------------


@dataclass(frozen=True)
class DeviceState:
    """What the database says about a device the broker knows."""

    deleted: bool
    live_key: str | None  # key id of its live ds_live_ token, None if all are revoked


def decide(client: dict[str, Any], state: DeviceState | None) -> str | None:
    """What to do with one device client of the broker: "delete", "disable",
    "enable" or None. Never anything that needs the token's plaintext."""
    if state is None or state.deleted:
        return "delete"
    disabled = bool(client.get("disabled"))
    if state.live_key is None or client.get("textdescription") != state.live_key:
        # the broker holds a revoked token's password (revoked while the broker was
        # unreachable, or the new password never arrived): it must not open
        return None if disabled else "disable"
    return "enable" if disabled else None


def action_commands(device_id: str, action: str) -> list[Command]:
    if action == "delete":
        return remove_device_commands(device_id)
    return [{"command": f"{action}Client", "username": device_id}]


# --- the client ---------------------------------------------------------------------


def _roles(client: dict[str, Any]) -> set[str]:
    return {str(r.get("rolename")) for r in client.get("roles", [])}


class DynSec:
    """Send commands, await their answers. The MQTT connection belongs to the
    caller: `send` publishes a payload on CONTROL_TOPIC (QoS 1) and returns False
    when there is no connection; the caller subscribes RESPONSE_TOPIC and hands every
    message on it to `feed` (from any thread)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        send: Callable[[bytes], bool],
        timeout: float = 10.0,
    ) -> None:
        self._loop = loop
        self._send = send
        self.timeout = timeout
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}

    def feed(self, payload: bytes) -> None:
        """An answer arrived (from paho's callback, run on the event loop by
        external.py's `_PahoLoop`; call_soon_threadsafe works from any thread)."""
        try:
            answers = json.loads(payload)["responses"]
        except (ValueError, KeyError, TypeError):
            log.warning("dynamic security: unreadable answer %r", payload[:200])
            return
        self._loop.call_soon_threadsafe(self._resolve, answers)

    def _resolve(self, answers: list[dict[str, Any]]) -> None:
        for a in answers:
            fut = self._waiting.pop(str(a.get("correlationData")), None)
            if fut is not None and not fut.done():
                fut.set_result(a)

    async def run(
        self, commands: Sequence[Command], ok: Iterable[str] = ()
    ) -> list[dict[str, Any]]:
        """Run commands (in messages of at most BATCH commands and MAX_MESSAGE_BYTES)
        and return their answers in order.
        An error not listed in `ok` raises DynSecError (after the whole batch ran)."""
        allowed = set(ok)
        out: list[dict[str, Any]] = []
        for chunk in _chunks([dict(c, correlationData=uuid.uuid4().hex) for c in commands]):
            futs = [self._loop.create_future() for _ in chunk]
            for c, f in zip(chunk, futs, strict=True):
                self._waiting[c["correlationData"]] = f
            try:
                if not self._send(json.dumps({"commands": chunk}).encode()):
                    raise DynSecUnavailable(chunk[0]["command"], "not connected to the broker")
                async with asyncio.timeout(self.timeout):
                    answers = await asyncio.gather(*futs)
            except TimeoutError:
                raise DynSecUnavailable(
                    chunk[0]["command"], f"no answer in {self.timeout:g} s"
                ) from None
            finally:
                for c in chunk:
                    self._waiting.pop(c["correlationData"], None)
            out.extend(answers)
        for a in out:
            err = a.get("error")
            if err and err not in allowed:
                raise DynSecError(str(a.get("command")), str(err))
        return out

    # --- what the server does with it ----------------------------------------------

    async def put_device(
        self, device_id: str, account: str, local_id: str, token: str, key_id: str
    ) -> None:
        await self.run(put_device_commands(device_id, account, local_id, token, key_id), ok=EXISTS)

    async def remove_device(self, device_id: str) -> None:
        await self.run(remove_device_commands(device_id), ok=GONE)

    async def set_enabled(self, device_id: str, enabled: bool) -> None:
        cmd = "enableClient" if enabled else "disableClient"
        await self.run([{"command": cmd, "username": device_id}], ok=GONE)

    async def get_client(self, username: str) -> dict[str, Any] | None:
        (a,) = await self.run([{"command": "getClient", "username": username}], ok=GONE)
        if a.get("error"):
            return None
        client: dict[str, Any] = a["data"]["client"]
        return client

    async def list_clients(self, page: int = 1000) -> list[dict[str, Any]]:
        clients: list[dict[str, Any]] = []
        while True:
            (a,) = await self.run(
                [{"command": "listClients", "verbose": True, "count": page, "offset": len(clients)}]
            )
            got = a["data"]["clients"]
            clients.extend(got)
            if len(got) < page or len(clients) >= int(a["data"].get("totalCount", 0)):
                return clients

    async def ensure_server_role(self, username: str) -> bool:
        """Give the server's own account the opensense-server role. True when the role
        was just added: Mosquitto then disconnects every connection of that account
        (so the answer never comes, and the caller reconnects and syncs again)."""
        await self.run(server_role_commands(), ok=EXISTS)
        me = await self.get_client(username)
        if me is None:
            raise DynSecError(
                "getClient", f"the server's account {username!r} is not a dynsec client"
            )
        if SERVER_ROLE in _roles(me):
            return False
        cmd = {"command": "addClientRole", "username": username, "rolename": SERVER_ROLE}
        if not self._send(json.dumps({"commands": [cmd]}).encode()):
            raise DynSecUnavailable("addClientRole", "not connected to the broker")
        return True

    async def apply(self, actions: dict[str, str]) -> None:
        """device id -> "delete" | "disable" | "enable", as `decide` said."""
        cmds = [c for dev, act in actions.items() for c in action_commands(dev, act)]
        await self.run(cmds, ok=GONE)
