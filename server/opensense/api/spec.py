"""The building blocks of the OpenAPI document: schema shorthands and the parts of
an operation. opensense/openapi.py assembles the document; a feature that documents
its own routes (status/apidoc.py, alarms/openapi.py) writes its fragment with these.
A leaf module, so that the fragments and the assembler never import each other."""

from __future__ import annotations

from typing import Any

S = dict[str, Any]
TS = {"type": "string", "format": "date-time"}
NTS = {"type": ["string", "null"], "format": "date-time"}
ID = {"type": "string", "minLength": 1, "maxLength": 64}
# names as the server takes them: 1-200 characters, not all blank
NAME = {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "\\S"}
MODEL = {"type": "string", "minLength": 1, "maxLength": 64, "pattern": "\\S"}


def ref(name: str) -> S:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(props: S, required: tuple[str, ...] = (), extra: bool = True) -> S:
    out: S = {"type": "object", "properties": props}
    if required:
        out["required"] = list(required)
    if not extra:
        out["additionalProperties"] = False
    return out


def listing(item: str) -> S:
    return obj({"data": {"type": "array", "items": ref(item)}}, ("data",))


def err(*statuses: int) -> S:
    text = {
        400: "Bad request: the message says which field and why",
        401: "No token, or a wrong, rotated or revoked one",
        403: "The token may not do this",
        404: "No such thing in this account",
        409: "Conflict with what exists",
        413: "Body larger than 64 KiB",
        422: "Well-formed but refused: out of range, unknown kind, invalid range",
        429: "Rate limited; see Retry-After",
        503: "The database cannot be reached; retry with backoff (see Retry-After)",
    }
    return {
        str(s): {"description": text[s], "content": {"application/json": {"schema": ref("Error")}}}
        for s in statuses
    }


def ok(status: int, schema: S | None, description: str = "OK") -> S:
    if schema is None:
        return {str(status): {"description": description}}
    return {
        str(status): {
            "description": description,
            "content": {"application/json": {"schema": schema}},
        }
    }


def body(schema: S, example: Any = None) -> S:
    media: S = {"schema": schema}
    if example is not None:
        media["example"] = example
    return {"required": True, "content": {"application/json": media}}


def path_param(name: str) -> S:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def q(name: str, schema: S, description: str = "", example: Any = None) -> S:
    out: S = {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }
    if example is not None:
        out["example"] = example
    return out


USER: list[S] = [{"userToken": []}]


def op(
    summary: str,
    responses: S,
    *,
    security: list[S] | None = None,
    uses_db: bool = True,
    **extra: Any,
) -> S:
    # Any request may be refused 400 before it reaches the handler: a NUL character
    # (%00) in the path or the query, or a body that cannot be read.
    responses = {**responses}
    responses.setdefault("400", err(400)["400"])
    if uses_db:
        responses.setdefault("503", err(503)["503"])
    out: S = {
        "summary": summary,
        "responses": responses,
        "security": USER if security is None else security,
    }
    out.update(extra)
    return out
