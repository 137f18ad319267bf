"""The OpenAPI 3.1 document, built from the route specs."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from scaiproxy import __version__
from scaiproxy.config import Settings
from scaiproxy.routes import RouteSpec

_ERROR_SCHEMA = {
    "type": "object",
    "required": ["detail"],
    "properties": {
        "detail": {
            "type": "object",
            "required": ["error", "message"],
            "properties": {
                "error": {"type": "string"},
                "message": {"type": "string"},
                "fix": {"type": "string"},
            },
            "additionalProperties": True,
        }
    },
}

# The errors any plugin route can return, besides those of its own.
_COMMON_ERRORS = {
    "400": "ScaiGrid rejected a value of the request (upstream_error)",
    "401": "Missing or invalid ScaiKey token",
    "403": "The caller lacks the route's permission",
    "404": "No such route",
    "405": "Method not allowed",
    "409": "ScaiGrid reported a conflict, such as a resolved checkpoint",
    "412": "No upstream credential could be chosen",
    "413": "Body over server.max_body_bytes",
    "422": "Invalid query, path or body value",
    "429": "ScaiGrid rate-limited the tenant",
    "500": "Unexpected gateway error",
    "502": "ScaiGrid failed, rejected the key or answered wrongly",
    "503": "Token signing keys unavailable",
    "504": "ScaiGrid did not answer in time",
}


def build_openapi(settings: Settings, specs: list[RouteSpec]) -> dict[str, Any]:
    """Describe every plugin route, with the envelopes the gateway returns."""
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = {"Error": _ERROR_SCHEMA}
    for spec in specs:
        path = settings.server.base_path + spec.path
        paths.setdefault(path, {})[spec.method.lower()] = _operation(spec, schemas)
    paths.update(_operational_paths(settings))
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "scaiproxy",
            "version": __version__,
            "description": "Gateway between the ScaiFlow canvas and ScaiGrid.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "scaikey": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
        "security": [{"scaikey": []}],
    }


def _operation(spec: RouteSpec, schemas: dict[str, Any]) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": spec.name,
        "summary": spec.summary or spec.name,
        "tags": list(spec.tags) or [spec.plugin],
        "parameters": [
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": {
                    "type": "string",
                    "pattern": r"^[A-Za-z0-9_.:-]{1,128}$",
                },
            }
            for name in spec.path_params
        ],
        "responses": _responses(spec),
    }
    if spec.description:
        operation["description"] = spec.description
    if spec.permission or spec.roles:
        needs = spec.permission or " or ".join(spec.roles)
        operation["description"] = (
            operation.get("description", "") + f"\n\nRequires: {needs}."
        ).strip()
    if spec.query is not None:
        operation["parameters"].extend(_query_parameters(spec.query, schemas))
    if spec.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _schema(spec.body, schemas)}},
        }
    if not spec.authenticated:
        operation["security"] = []
    return operation


def _responses(spec: RouteSpec) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    if spec.status == 204:
        responses["204"] = {"description": "Done; no body"}
    else:
        data = dict(spec.response) if spec.response else {}
        responses[str(spec.status)] = {
            "description": "Success",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["data"],
                        "properties": {"data": data},
                    }
                }
            },
        }
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for status, description in _COMMON_ERRORS.items():
        responses[status] = {"description": description, "content": error}
    if spec.body is not None:
        responses["400"] = {
            "description": "Body is not a JSON object, or ScaiGrid rejected a value",
            "content": error,
        }
        responses["408"] = {
            "description": "Body not received in full within server.body_timeout_s",
            "content": error,
        }
    return responses


def _schema(model: type[BaseModel], schemas: dict[str, Any]) -> dict[str, Any]:
    """Return the model's JSON schema, moving nested definitions to components."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(schema.pop("$defs", {}))
    return schema


def _query_parameters(
    model: type[BaseModel], schemas: dict[str, Any]
) -> list[dict[str, Any]]:
    schema = _schema(model, schemas)
    required = set(schema.get("required", []))
    parameters = []
    for name, prop in schema.get("properties", {}).items():
        prop = dict(prop)
        prop.pop("title", None)
        parameter = {
            "name": name,
            "in": "query",
            "required": name in required,
            "schema": prop,
        }
        if "description" in prop:
            parameter["description"] = prop.pop("description")
        parameters.append(parameter)
    return parameters


def _operational_paths(settings: Settings) -> dict[str, Any]:
    """Describe the unauthenticated routes outside the base path."""

    def status_schema(value: str) -> dict[str, Any]:
        return {
            "type": "object",
            "required": ["data"],
            "properties": {
                "data": {
                    "type": "object",
                    "properties": {"status": {"type": "string", "const": value}},
                }
            },
        }

    def operation(
        name: str, summary: str, content: dict[str, Any], **extra: Any
    ) -> dict[str, Any]:
        responses = {"200": {"description": summary, "content": content}, **extra}
        return {
            "get": {
                "operationId": name,
                "summary": summary,
                "tags": ["operations"],
                "security": [],
                "responses": responses,
            }
        }

    def json_content(schema: dict[str, Any]) -> dict[str, Any]:
        return {"application/json": {"schema": schema}}

    error = json_content({"$ref": "#/components/schemas/Error"})
    return {
        "/healthz": operation(
            "healthz", "The process is up", json_content(status_schema("ok"))
        ),
        "/readyz": operation(
            "readyz",
            "The gateway is started and its upstream session is open",
            json_content(status_schema("ready")),
            **{"503": {"description": "Starting or stopping", "content": error}},
        ),
        "/metrics": operation(
            "metrics",
            "Prometheus metrics in the text exposition format",
            {"text/plain": {"schema": {"type": "string"}}},
        ),
        settings.server.openapi_path: operation(
            "openapi", "This OpenAPI document", json_content({"type": "object"})
        ),
    }
