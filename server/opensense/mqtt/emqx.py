"""EMQX HTTP authentication and authorization (EMQX 5's HTTP auth contract).

For a cluster running EMQX (docs/product.md#hosting) instead of the
embedded broker or Mosquitto. EMQX asks these endpoints at every CONNECT and every
PUBLISH/SUBSCRIBE, so no broker keeps a copy of the tokens and a rotation takes effect
at the next CONNECT. Configure in EMQX (docs/mqtt.md has the full snippet):

  authentication: HTTP POST {OPENSENSE}/v1/mqtt/emqx/authn
    body {"username": "${username}", "password": "${password}", "clientid": "${clientid}"}
  authorization:  HTTP POST {OPENSENSE}/v1/mqtt/emqx/authz
    body {"username": "${username}", "topic": "${topic}", "action": "${action}"}
  headers: Authorization: Bearer <OPENSENSE_EMQX_SECRET>

Answers are 200 {"result": "allow" | "deny"} (authn adds "is_superuser": false).
A malformed request is a 4xx envelope, which EMQX treats as "ignore". A CONNECT is
allowed only under the device's own id as client id, so one client id names every
session a device can hold.

EMQX asks again only at the next CONNECT, so a live session would outlast a rotation.
With OPENSENSE_EMQX_API_URL (and an API key) every server process that hears a
revocation (LISTEN opensense_token_revoked) kicks the device's session through EMQX's
REST API, `DELETE {url}/clients/{clientid}` with HTTP basic auth (API key, secret):
204 kicked, 404 not connected (https://docs.emqx.com/en/emqx/v5.0/admin/api.html;
emqx_mgmt_api_clients.erl). The device reconnects and its old token is denied.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web

from opensense_contract import topics

from ..api.auth import bearer
from ..api.body import json_object
from ..api.keys import CONFIG, POOL
from ..errors import ApiError
from ..settings import Config
from .ingest import MqttIngest

log = logging.getLogger(__name__)
routes = web.RouteTableDef()


def _check_secret(request: web.Request) -> None:
    secret = request.app[CONFIG].emqx_secret
    if not secret:
        raise ApiError(
            "not_found", "EMQX authentication is not enabled (set OPENSENSE_EMQX_SECRET)"
        )
    given = bearer(request)
    if given is None:
        raise ApiError("auth_required", "send Authorization: Bearer <OPENSENSE_EMQX_SECRET>")
    if not hmac.compare_digest(given.encode(), secret.encode()):
        raise ApiError("token_invalid", "the EMQX shared secret is wrong")


def _field(body: dict[str, Any], name: str) -> str:
    v = body.get(name)
    if not isinstance(v, str) or not v:
        raise ApiError("invalid_request", f"{name} must be a non-empty string")
    return v


@routes.post("/v1/mqtt/emqx/authn")
async def emqx_authn(request: web.Request) -> web.Response:
    _check_secret(request)
    body = await json_object(request)
    username, password = _field(body, "username"), _field(body, "password")
    if body.get("clientid") != username:
        # the session is kicked by client id at a rotation: it must be the device's own
        log.info("EMQX CONNECT of %s refused: client id is not the device id", username[:64])
        return web.json_response({"result": "deny", "is_superuser": False})
    try:
        await MqttIngest(request.app).authenticate(username, password)
    except ApiError as err:
        if err.code not in ("token_invalid", "forbidden", "auth_required"):
            raise
        log.info("EMQX CONNECT of %s refused: %s", username[:64], err.message)
        return web.json_response({"result": "deny", "is_superuser": False})
    return web.json_response({"result": "allow", "is_superuser": False})


@routes.post("/v1/mqtt/emqx/authz")
async def emqx_authz(request: web.Request) -> web.Response:
    _check_secret(request)
    body = await json_object(request)
    username, topic, action = (
        _field(body, "username"),
        _field(body, "topic"),
        _field(body, "action"),
    )
    if action not in ("publish", "subscribe"):
        raise ApiError("invalid_request", "action must be publish or subscribe")
    async with request.app[POOL].connection() as conn:
        cur = await conn.execute(
            "SELECT account_id, local_id FROM devices WHERE id = %s AND deleted_at IS NULL",
            (username,),
        )
        row = await cur.fetchone()
    if row is None:
        return web.json_response({"result": "deny"})
    check = topics.publish_refusal if action == "publish" else topics.subscribe_refusal
    reason = check(row[0], row[1], topic)
    if reason:
        log.info("EMQX %s of %s by %s refused: %s", action, topic[:200], username, reason)
        return web.json_response({"result": "deny"})
    return web.json_response({"result": "allow"})


class EmqxApi:
    """Kicks a device's live EMQX session (see the module docstring)."""

    ATTEMPTS = 3

    def __init__(self, cfg: Config, retry_delay: float = 1.0) -> None:
        self.url = cfg.emqx_api_url.rstrip("/")
        self.headers = {
            "Authorization": aiohttp.encode_basic_auth(cfg.emqx_api_key, cfg.emqx_api_secret)
        }
        self.retry_delay = retry_delay
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def kick(self, client_id: str) -> bool:
        """True once EMQX answered 204 (kicked) or 404 (not connected); retried a few
        times when EMQX is unreachable or fails, then logged."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        url = f"{self.url}/clients/{quote(client_id, safe='')}"
        problem = ""
        for attempt in range(self.ATTEMPTS):
            if attempt:
                await asyncio.sleep(self.retry_delay * 2 ** (attempt - 1))
            try:
                async with self._session.delete(
                    url, headers=self.headers, allow_redirects=False
                ) as r:
                    if r.status in (204, 404):
                        log.info("EMQX session of %s kicked (%d)", client_id, r.status)
                        return True
                    problem = f"HTTP {r.status}"
                    if r.status in (401, 403):
                        break  # a wrong API key does not get better by asking again
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
        log.warning(
            "could not kick the EMQX session of %s (%s): it ends at its next CONNECT",
            client_id,
            problem,
        )
        return False
