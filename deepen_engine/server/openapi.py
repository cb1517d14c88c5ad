"""The API page: an OpenAPI 3.1 document (`/openapi.json`) built from the request models
in `schema.py` (pydantic's JSON schemas), and `/docs`, the same fields as a plain HTML page
that needs no script or network.
"""

from __future__ import annotations

import html
from functools import cache
from typing import Any

from pydantic import BaseModel

from .. import __version__
from .schema import ChatRequest, CompletionRequest

_REF = "#/components/schemas/{model}"
_ERRORS = {
    "400": "A bad parameter, named in error.param.",
    "401": "A missing or wrong API key.",
    "408": "The request ran past its timeout.",
    "429": "The queue is full; retry later.",
    "500": "A member failed.",
    "503": "Loading, or shutting down (Retry-After).",
}
_ENDPOINTS: dict[str, tuple[type[BaseModel], str]] = {
    "/v1/chat/completions": (ChatRequest, "Chat completion (stream: server-sent events)."),
    "/v1/completions": (CompletionRequest, "Text completion (stream: server-sent events)."),
}


@cache
def openapi_document() -> dict[str, Any]:
    """The server's OpenAPI document (generated from the request models)."""
    schemas: dict[str, Any] = {}
    paths: dict[str, Any] = {}
    for path, (model, summary) in _ENDPOINTS.items():
        schema = model.model_json_schema(ref_template=_REF)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        responses = {"200": {"description": "The answer, in OpenAI's format."}}
        responses.update({k: {"description": v} for k, v in _ERRORS.items()})
        paths[path] = {
            "post": {
                "summary": summary,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}
                    },
                },
                "responses": responses,
            }
        }
    for path, summary in {
        "/v1/models": "The one model served.",
        "/health": "ok (200), or loading / draining / error (503).",
        "/metrics": "Prometheus text format.",
    }.items():
        paths[path] = {"get": {"summary": summary, "responses": {"200": {"description": "OK"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "deepen serve", "version": __version__},
        "paths": paths,
        "components": {"schemas": schemas},
    }


@cache
def docs_page() -> str:
    """`/docs`: each endpoint's fields, types and descriptions as an HTML table."""
    parts = ["<!doctype html><title>deepen serve API</title><h1>deepen serve API</h1>"]
    parts.append('<p>Machine-readable: <a href="/openapi.json">/openapi.json</a>.</p>')
    for path, (model, summary) in _ENDPOINTS.items():
        schema = model.model_json_schema()
        required = set(schema.get("required", []))
        parts.append(f"<h2>POST {path}</h2><p>{html.escape(summary)}</p>")
        parts.append("<table border=1><tr><th>field</th><th>type</th><th>about</th></tr>")
        for name, spec in schema["properties"].items():
            kind = _type_of(spec) + (" (required)" if name in required else "")
            about = html.escape(spec.get("description", ""))
            parts.append(f"<tr><td>{name}</td><td>{html.escape(kind)}</td><td>{about}</td></tr>")
        parts.append("</table>")
    return "\n".join(parts)


def _type_of(spec: dict[str, Any]) -> str:
    if "anyOf" in spec:
        return " | ".join(_type_of(s) for s in spec["anyOf"] if s.get("type") != "null")
    if "enum" in spec:
        return " | ".join(repr(v) for v in spec["enum"])
    if spec.get("type") == "array":
        return f"list[{_type_of(spec.get('items', {}))}]"
    return str(spec.get("type", "any"))
