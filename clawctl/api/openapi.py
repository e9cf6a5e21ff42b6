"""The OpenAPI document, with the request bodies the routes parse themselves.

Both faces read their bodies with `api/wire.json_body` (JSON whatever the Content-Type, errors
in the face's shape), so FastAPI cannot see the body models; they are added here, so clients,
generators and the API fuzz test see every field and constraint. The faces' models share one
`components/schemas` namespace: a name two faces define differently is a bug, caught here."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

REF = "#/components/schemas/{model}"


def install_openapi(app: FastAPI, bodies: dict[str, type[BaseModel]]) -> None:
    """Serve `app`'s document with `bodies` (POST path -> model) as required JSON bodies."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            added: dict[str, Any] = {}  # name -> schema, from `bodies`
            for path, model in bodies.items():
                schema = model.model_json_schema(ref_template=REF)
                for name, definition in {
                    **schema.pop("$defs", {}),
                    model.__name__: schema,
                }.items():
                    if added.setdefault(name, definition) != definition:
                        raise RuntimeError(f"two request schemas are both named {name!r}")
                    schemas[name] = definition
                document["paths"][path]["post"]["requestBody"] = {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}
                    },
                }
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
