"""Account: its users and their roles, its API and webhook tokens, and the export of
everything it owns (docs/dashboard.md, "Account").

Every role sees the users and their roles; only an owner invites, changes a role,
removes a user, sees and makes tokens and exports. An account keeps at least one
owner. Invitations, role changes and removals go to the audit trail (`user.invite`,
`user.role`, `user.remove`), as does each export (`account.export`)."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from psycopg import AsyncConnection

from .. import audit
from ..api.keys import CONFIG, LOGIN_MAILER, POOL
from ..devices import store as devices
from ..errors import ApiError
from ..ids import new_id
from . import export
from .forms import errors_of, posted, text
from .routes import check_email, client_ip, limit
from .session import ROLES, render, require, signed_in
from .store import User, issue_sign_in

routes = web.RouteTableDef()

ROLE_INVALID = f"role must be one of {', '.join(ROLES)}"
LAST_OWNER = "an account keeps at least one owner: make another user owner first"
MAX_USERS = 500  # users of one account: every input is bounded
INVITE_FIELDS = ("email", "role")
TOKEN_FIELDS = ("kind", "name")


def check_role(raw: Any) -> str:
    if raw not in ROLES:
        raise ApiError("invalid_request", ROLE_INVALID)
    return str(raw)


async def users_of(conn: AsyncConnection[Any], account_id: str) -> list[dict[str, Any]]:
    cur = await conn.execute(
        "SELECT id, email, role, created_at FROM users WHERE account_id = %s"
        " ORDER BY created_at, id",
        (account_id,),
    )
    return [
        {"id": r[0], "email": r[1], "role": r[2], "created_at": r[3]} for r in await cur.fetchall()
    ]


async def account_page(
    request: web.Request,
    conn: AsyncConnection[Any],
    user: User,
    status: int = 200,
    **over: Any,
) -> web.Response:
    now = request.app[CONFIG].clock()
    tokens = []
    if user.role == "owner":
        tokens = [
            t
            for t in await devices.list_tokens(conn, user.account_id, now)
            if t["kind"] in devices.TOKEN_KINDS
        ]
    ctx: dict[str, Any] = {
        "users": await users_of(conn, user.account_id),
        "roles": ROLES,
        "tokens": tokens,
        "errors": {},
        "values": {},
        "new_token": None,
        "notice": None,
        **over,
    }
    return render(request, user, "account.html", ctx, status=status)


@routes.get("/account")
async def account(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        user = await signed_in(request, conn)
        return await account_page(request, conn, user)


@routes.post("/account/users")
async def invite(request: web.Request) -> web.Response:
    """A new user with the chosen role, mailed a sign-in code and link at once."""
    now = request.app[CONFIG].clock()
    async with request.app[POOL].connection() as conn:
        user, form = await posted(request, conn, "owner")
        await limit(request, conn)  # each invitation sends a mail: the sign-in rate limit
        values = {k: text(form, k) or "" for k in INVITE_FIELDS}
        try:
            email = check_email(text(form, "email"))
            role = check_role(text(form, "role"))
            async with conn.transaction():
                cur = await conn.execute(
                    "SELECT count(*) FROM users WHERE account_id = %s", (user.account_id,)
                )
                if ((await cur.fetchone()) or (0,))[0] >= MAX_USERS:
                    raise ApiError("conflict", f"an account has at most {MAX_USERS} users")
                cur = await conn.execute(
                    "INSERT INTO users (id, account_id, email, role) VALUES (%s, %s, %s, %s)"
                    " ON CONFLICT (account_id, email) DO NOTHING RETURNING id",
                    (new_id("usr"), user.account_id, email, role),
                )
                row = await cur.fetchone()
                if row is None:
                    raise ApiError("conflict", f"email: {email} is a user of this account already")
                invitee = User(row[0], user.account_id, email, role)
                await audit.record(
                    conn,
                    account_id=user.account_id,
                    actor=user.id,
                    action="user.invite",
                    subject=invitee.id,
                    data={"email": email, "role": role},
                    at=now,
                )
                code, link = await issue_sign_in(
                    conn, invitee, now, {"ip": client_ip(request), "via": "invitation"}
                )
        except ApiError as err:
            errors = errors_of(err, INVITE_FIELDS)
            return await account_page(request, conn, user, err.status, errors=errors, values=values)
        request.app[LOGIN_MAILER].send(email, code, link)
        notice = f"{email} is invited as {role}: a sign-in code and link are on their way."
        return await account_page(request, conn, user, notice=notice)


async def lock_user(conn: AsyncConnection[Any], account_id: str, user_id: str) -> tuple[str, str]:
    """(email, role) of a user of this account, its owners locked against a concurrent
    change (the last-owner check holds); 404 for anyone else's."""
    await conn.execute(
        "SELECT id FROM users WHERE account_id = %s AND role = 'owner' ORDER BY id FOR UPDATE",
        (account_id,),
    )
    cur = await conn.execute(
        "SELECT email, role FROM users WHERE id = %s AND account_id = %s FOR UPDATE",
        (user_id, account_id),
    )
    row = await cur.fetchone()
    if row is None:
        raise ApiError("user_not_found", f"no user {user_id[:40]!r} in this account")
    return row[0], row[1]


async def other_owners(conn: AsyncConnection[Any], account_id: str, user_id: str) -> int:
    cur = await conn.execute(
        "SELECT count(*) FROM users WHERE account_id = %s AND role = 'owner' AND id <> %s",
        (account_id, user_id),
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def change_user(request: web.Request, remove: bool) -> web.Response:
    """A user's new role (the form's `role`), or (`remove`) the user removed, which
    signs it out everywhere (its sessions go with it); audited, and never the last
    owner's."""
    now = request.app[CONFIG].clock()
    target = request.match_info["user_id"]
    async with request.app[POOL].connection() as conn:
        user, form = await posted(request, conn, "owner")
        try:
            async with conn.transaction():
                email, before = await lock_user(conn, user.account_id, target)
                after = None if remove else check_role(text(form, "role"))
                if (
                    before == "owner"
                    and after != "owner"
                    and not await other_owners(conn, user.account_id, target)
                ):
                    raise ApiError("conflict", LAST_OWNER)
                if after is None:
                    await conn.execute("DELETE FROM users WHERE id = %s", (target,))
                    action, data = "user.remove", {"email": email, "role": before}
                else:
                    await conn.execute("UPDATE users SET role = %s WHERE id = %s", (after, target))
                    action, data = "user.role", {"email": email, "from": before, "to": after}
                if after != before:
                    await audit.record(
                        conn,
                        account_id=user.account_id,
                        actor=user.id,
                        action=action,
                        subject=target,
                        data=data,
                        at=now,
                    )
        except ApiError as err:
            if err.status == 404:
                raise
            errors = {f"role-{target}": err.message}
            return await account_page(request, conn, user, err.status, errors=errors)
        if target == user.id and after != "owner":  # no longer an owner, or no user
            where = "/auth/login" if after is None else "/account"
            return web.Response(status=303, headers={"Location": where})
        notice = f"{email} is removed." if after is None else f"{email} is now {after}."
        return await account_page(request, conn, user, notice=notice)


@routes.post("/account/users/{user_id}/role")
async def change_role(request: web.Request) -> web.Response:
    return await change_user(request, remove=False)


@routes.post("/account/users/{user_id}/remove")
async def remove_user(request: web.Request) -> web.Response:
    return await change_user(request, remove=True)


@routes.post("/account/tokens")
async def create_token(request: web.Request) -> web.Response:
    """A new ua_live_ or whk_ token (POST /v1/tokens's checks and store), shown once."""
    cfg = request.app[CONFIG]
    async with request.app[POOL].connection() as conn:
        user, form = await posted(request, conn, "owner")
        values = {k: text(form, k) or "" for k in TOKEN_FIELDS}
        try:
            kind, name = devices.check_token_request(
                {"kind": text(form, "kind"), "name": text(form, "name") or ""}
            )
            async with conn.transaction():
                _, plaintext = await devices.create_token(
                    conn, user.account_id, kind, cfg.bcrypt_rounds, name, actor=user.id
                )
        except ApiError as err:
            errors = errors_of(err, TOKEN_FIELDS)
            return await account_page(request, conn, user, err.status, errors=errors, values=values)
        return await account_page(request, conn, user, new_token=plaintext)


@routes.post("/account/tokens/{token_id}/revoke")
async def revoke_token(request: web.Request) -> web.Response:
    now = request.app[CONFIG].clock()
    async with request.app[POOL].connection() as conn:
        user, _ = await posted(request, conn, "owner")
        async with conn.transaction():
            await devices.revoke_token(
                conn, user.account_id, request.match_info["token_id"], now, actor=user.id
            )
        return await account_page(request, conn, user, notice="The token is revoked.")


@routes.get("/account/export")
async def export_zip(request: web.Request) -> web.StreamResponse:
    """The ZIP of everything the account owns, streamed (web/export.py)."""
    now = request.app[CONFIG].clock()
    async with request.app[POOL].connection() as conn:
        user = await signed_in(request, conn)
        require(user, "owner")
        async with conn.transaction():
            await audit.record(
                conn,
                account_id=user.account_id,
                actor=user.id,
                action="account.export",
                subject=user.account_id,
                data={"ip": client_ip(request)},
                at=now,
            )
        name = f"opensense-{user.account_id}-{now:%Y%m%d-%H%M%S}.zip"
        resp = web.StreamResponse(
            headers={
                "Content-Type": "application/zip",
                "Content-Disposition": f'attachment; filename="{name}"',
            }
        )
        await resp.prepare(request)
        await export.stream(conn, user.account_id, resp)
    await resp.write_eof()
    return resp
