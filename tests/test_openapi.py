"""The API contract, gateway/static/openapi.json: valid, served, complete, and true to life.

- It is an OpenAPI 3.1 document (checked against the specification's own
  schema), every schema in it is a valid JSON Schema 2020-12, every `$ref`
  resolves, and every example matches its schema.
- GET /openapi.json serves exactly that file.
- Every route the app serves is described, and every described operation is
  a route: a route added without a description fails here, and so does a
  description of a route that went away.
- The request examples are real: a live gateway accepts each one.

tests/test_fuzz.py holds the document to the rest: schemathesis checks every
answer of a live gateway against it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from jsonschema import Draft202012Validator

from gateway import __version__
from gateway.app import create_app
from gateway.settings import Settings
from tests.support import GatewayFactory

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT_PATH = ROOT / "gateway" / "static" / "openapi.json"
DOCUMENT: dict[str, Any] = json.loads(DOCUMENT_PATH.read_text())
OPERATION_KEYS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
# aiohttp's `*` route: any method. The document describes it with the methods that
# carry meaning for TikTok's other APIs; the operation's text says every other one
# (HEAD, OPTIONS, ...) is relayed the same way.
ANY_METHOD_DESCRIBED_AS = frozenset({"get", "post", "put", "patch", "delete"})


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method in OPERATION_KEYS:
            if method in item:
                yield path, method, item[method]


def served_routes(app: Any) -> set[tuple[str, str]]:
    """(path, method) of every route, paths in OpenAPI's template form."""
    routes: set[tuple[str, str]] = set()
    for route in app.router.routes():
        # aiohttp's `{tail:.*}` is OpenAPI's `{tail}`: the pattern is not part of the path.
        path = re.sub(r"\{(\w+):[^}]*\}", r"{\1}", route.resource.canonical)
        routes.add((path, route.method.lower()))
    # add_get registers HEAD beside GET (allow_head): HEAD is GET without the body (RFC
    # 9110 9.3.2), so a described GET describes it; it is not listed on its own.
    return {(p, m) for p, m in routes if not (m == "head" and (p, "get") in routes)}


def every_route_settings() -> Settings:
    """Settings under which every optional route is served."""
    return dataclasses.replace(Settings(), admin_token="admin-token", passthrough=True)


# -- the document itself ---------------------------------------------------------------


def test_the_document_is_valid_openapi_3_1() -> None:
    # The specification's own schema, as schemathesis ships it.
    from schemathesis.specs.openapi.definitions import OPENAPI_31

    assert DOCUMENT["openapi"].startswith("3.1.")
    errors = sorted(Draft202012Validator(OPENAPI_31).iter_errors(DOCUMENT), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:10])
    assert len({op["operationId"] for _p, _m, op in operations(DOCUMENT)}) == len(
        list(operations(DOCUMENT))
    ), "operationIds must be unique"
    assert DOCUMENT["info"]["version"] == __version__


def _schemas(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every JSON Schema in the document: components and those inline in operations."""
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{path}/{key}"
            if key == "schema" or (path.endswith("/components/schemas") and key):
                yield here, item
            elif key not in ("example", "examples"):
                yield from _schemas(item, here)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _schemas(item, f"{path}/{index}")


def _validator(schema: Any) -> Draft202012Validator:
    """A validator for `schema`, resolving `#/components/...` in this document."""
    # Carried along as an unknown keyword, the components are where `#/...` points.
    return Draft202012Validator({**schema, "components": DOCUMENT["components"]})


def test_every_schema_is_valid_and_every_reference_resolves() -> None:
    schemas = list(_schemas(DOCUMENT))
    assert len(schemas) > 40
    for _where, schema in schemas:
        Draft202012Validator.check_schema(schema)
    refs = re.findall(r'"\$ref": "([^"]+)"', DOCUMENT_PATH.read_text())
    for ref in set(refs):
        assert ref.startswith("#/"), ref
        node: Any = DOCUMENT
        for part in ref[2:].split("/"):
            assert part in node, f"{ref} does not resolve"
            node = node[part]


def _examples() -> Iterator[tuple[str, Any, Any]]:
    """(where, schema, example) for each example given beside a schema."""
    for path, method, op in operations(DOCUMENT):
        bodies = op.get("requestBody", {}).get("content", {})
        answers = [
            media
            for response in op["responses"].values()
            for media in _resolve(response).get("content", {}).values()
        ]
        for media in [*bodies.values(), *answers]:
            named = {k: _resolve(v)["value"] for k, v in media.get("examples", {}).items()}
            if "example" in media:
                named["example"] = media["example"]
            for name, value in named.items():
                yield f"{method.upper()} {path} {name}", media["schema"], value


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = DOCUMENT
        for part in node["$ref"][2:].split("/"):
            target = target[part]
        node = target
    return node


def test_every_example_matches_its_schema() -> None:
    examples = list(_examples())
    assert len(examples) >= 10
    for where, schema, value in examples:
        if schema.get("type") == "string" and "contentSchema" in schema:
            value = json.loads(value)  # a text/plain beacon carrying JSON
            schema = schema["contentSchema"]
        errors = list(_validator(schema).iter_errors(value))
        assert not errors, f"{where}: {errors[0].message}"


def test_the_readme_links_the_document() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "gateway/static/openapi.json" in readme
    assert "/openapi.json" in readme


# -- the document and the app ----------------------------------------------------------


def test_every_route_is_described_and_every_description_is_served() -> None:
    served = served_routes(create_app(every_route_settings()))
    described: set[tuple[str, str]] = {(p, m) for p, m, _op in operations(DOCUMENT)}
    for path, method in sorted(served):
        if method == "*":
            have = {m for p, m in described if p == path}
            missing = ANY_METHOD_DESCRIBED_AS - have
            assert not missing, f"* {path}: the document lacks {sorted(missing)}"
            described -= {(path, m) for m in have}
        else:
            assert (path, method) in described, f"{method.upper()} {path} is not in the document"
            described.discard((path, method))
    assert not described, f"described but not served: {sorted(described)}"


async def test_the_document_is_served_at_openapi_json(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(forward=False)
    async with http.get(f"{gateway.url}/openapi.json") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        assert await resp.read() == DOCUMENT_PATH.read_bytes()


def _request_examples() -> Iterator[Any]:
    for path, method, op in operations(DOCUMENT):
        if "{" in path:
            continue
        for media_type, media in op.get("requestBody", {}).get("content", {}).items():
            for name, example in media.get("examples", {}).items():
                value = _resolve(example)["value"]
                yield pytest.param(path, method, media_type, value, id=f"{method} {path} {name}")


@pytest.mark.parametrize(("path", "method", "media_type", "example"), list(_request_examples()))
async def test_each_request_example_is_accepted(
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    path: str,
    method: str,
    media_type: str,
    example: Any,
) -> None:
    # Sandbox mode: the examples' pixel code is TikTok's placeholder, not a configured one.
    gateway = await make_gateway(pixels={}, forward=False)
    raw = example.encode() if isinstance(example, str) else json.dumps(copy.deepcopy(example))
    headers = {"Content-Type": media_type, "Access-Token": "example-token"}
    async with http.request(method, gateway.url + path, data=raw, headers=headers) as resp:
        answer = await resp.json()
    envelope = answer["answer"] if path == "/demo/order" else answer  # the demo relays one
    assert (resp.status, envelope["code"]) == (200, 0), answer
