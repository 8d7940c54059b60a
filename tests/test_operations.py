"""The operation table (`hf_escrow.operations`) against every face that is written by hand:
each operation has its client method, ledger method, REST route (method, path, body and
query fields, Idempotency-Key), MCP tool and CLI command, or an exemption with its reason;
and no route or tool exists that the table does not know."""

from __future__ import annotations

import asyncio
import inspect
import re

import pytest
import typer

from hf_escrow.client import EscrowClient
from hf_escrow.ledger import Ledger
from hf_escrow.operations import (
    ACTING, ADAPTER_ROUTES, AMOUNT, BODY, FLAG, IN_BODY, ITEMS, NUMBER, OPERATIONS, OPERATOR_ROUTES, PATH, QUERY,
    TARGET, Exempt,
)
from hf_escrow.server import create_app
from hf_escrow.server.mcp_tools import build_mcp

# Our API and the seeds' routes; health, metrics, docs, the dashboard and /mcp are no operations.
OURS = re.compile(r"^/(api/|escrow/|register$|claim$)")


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    ledger = Ledger(f"sqlite:///{tmp_path_factory.mktemp('ops') / 'ledger.db'}")
    yield ledger
    ledger.close()


@pytest.fixture(scope="module")
def openapi(ledger) -> dict:
    return create_app(ledger, sweep_interval_s=0, mcp=False).openapi()


def _shape(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "{}", path)


def _routes_of(op) -> list[str]:
    paths = [op.path] + ([op.token_path] if op.token_path else [])
    paths += [op.path.replace("{" + f.name + "}", f.none_segment) for f in op.fields if f.none_segment]
    return [f"{op.method} {_shape(path)}" for path in paths]


def _app_routes(openapi: dict) -> dict[str, dict]:
    return {f"{method.upper()} {_shape(path)}": operation for path, methods in openapi["paths"].items()
            if OURS.match(path) for method, operation in methods.items()}


def _schema(openapi: dict, ref_holder: dict) -> dict:
    ref = ref_holder.get("$ref") or next((s["$ref"] for s in ref_holder.get("anyOf", []) if "$ref" in s), None)
    return openapi["components"]["schemas"][ref.rsplit("/", 1)[-1]] if ref else {}


def test_every_operation_has_its_route_and_no_route_is_unknown(openapi):
    routes = _app_routes(openapi)
    expected = {route: op.name for op in OPERATIONS.values() for route in _routes_of(op)}
    missing = sorted(set(expected) - set(routes))
    assert not missing, f"operations without their route: {missing}"
    known = set(expected) | {_shape(r) for r in ADAPTER_ROUTES} | {_shape(r) for r in OPERATOR_ROUTES}
    unknown = sorted(set(routes) - known)
    assert not unknown, f"routes the operation table does not know: {unknown}"
    assert set(ADAPTER_ROUTES.values()) <= set(OPERATIONS), ADAPTER_ROUTES


def test_each_route_takes_the_fields_the_table_sends_and_the_key_when_keyed(openapi):
    routes = _app_routes(openapi)
    for op in OPERATIONS.values():
        body_names = {f.sent_as for f in op.fields if f.how in IN_BODY}
        query_names = {f.sent_as for f in op.fields if f.how in (QUERY, FLAG)}
        for route in _routes_of(op):
            operation = routes[route]
            params = {(p["in"], p["name"]) for p in operation.get("parameters", [])}
            assert {("query", name) for name in query_names} <= params, (op.name, route, params)
            # The server's bodies ignore unknown fields: a field it does not declare would be lost.
            content = (operation.get("requestBody") or {}).get("content", {}).get("application/json", {})
            schema = _schema(openapi, content.get("schema", {}))
            wanted = body_names | ({"spend_token"} if route.endswith("/holds") and op.token_path and
                                   route == f"{op.method} {_shape(op.token_path)}" else set())
            assert wanted <= set(schema.get("properties", {})), (op.name, route, wanted, schema.get("properties"))
            if op.item:
                item_schema = _schema(openapi, schema["properties"]["items"]["items"])
                assert {f.sent_as for f in op.item} <= set(item_schema["properties"]), (op.name, item_schema)
            assert (("header", "Idempotency-Key") in params) == op.keyed, (op.name, route, "Idempotency-Key")


def test_every_operation_has_its_mcp_tool_or_a_reason_and_no_tool_is_unknown(ledger):
    tools = {tool.name for tool in asyncio.run(build_mcp(ledger).list_tools())}
    named = {op.mcp: op.name for op in OPERATIONS.values() if isinstance(op.mcp, str)}
    assert set(named) <= tools, f"operations without their tool: {sorted(set(named) - tools)}"
    assert tools <= set(named), f"tools the operation table does not know: {sorted(tools - set(named))}"
    for op in OPERATIONS.values():
        assert isinstance(op.mcp, str) or (isinstance(op.mcp, Exempt) and op.mcp.reason), op.name


def _cli_commands(group, prefix: str = "") -> set[str]:
    names = set()
    for name, command in getattr(group, "commands", {}).items():
        names.add(prefix + name)
        names |= _cli_commands(command, f"{prefix}{name} ")
    return names


def test_every_operation_has_its_cli_command_or_a_reason():
    from hf_escrow.cli import app
    commands = _cli_commands(typer.main.get_command(app))
    for op in OPERATIONS.values():
        if isinstance(op.cli, str):
            assert op.cli in commands, (op.name, op.cli, sorted(commands))
        else:
            assert isinstance(op.cli, Exempt) and op.cli.reason, op.name


def test_the_client_has_one_method_per_operation_taking_the_tables_arguments():
    public = {name for name, _ in inspect.getmembers(EscrowClient, inspect.isfunction) if not name.startswith("_")}
    assert public - {"close"} == set(OPERATIONS), sorted(public ^ set(OPERATIONS))
    for op in OPERATIONS.values():
        parameters = list(inspect.signature(getattr(EscrowClient, op.name)).parameters)[1:]
        assert sorted(parameters) == sorted(op.arguments), (op.name, parameters, op.arguments)


def test_the_ledger_method_takes_the_positional_params_then_the_rest_by_name():
    for op in OPERATIONS.values():
        parameters = inspect.signature(getattr(Ledger, op.ledger_method)).parameters
        names = list(parameters)[1 + op.acts:]   # after self, and the acting agent
        assert names[:len(op.positional)] == list(op.positional), (op.name, names)
        for name in set(op.arguments) - set(op.positional):
            assert name in parameters and parameters[name].kind in (
                inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD), (op.name, name)


def test_each_field_travels_one_known_way():
    for op in OPERATIONS.values():
        for field in op.fields + op.item:
            assert field.how in (BODY, AMOUNT, NUMBER, PATH, QUERY, FLAG, ITEMS, TARGET, ACTING), (op.name, field)
            if field.how in (PATH, TARGET):
                assert "{" + field.name + "}" in op.path, (op.name, field.name)
        assert bool(op.item) == any(f.how == ITEMS for f in op.fields) == bool(op.item_noun), op.name
        assert (op.token_path is not None) == any(f.how == TARGET for f in op.fields), op.name
