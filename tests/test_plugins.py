"""Plugin loading: order, hook checks, route collisions, config blocks, and a test
plugin served through the whole middleware chain."""

from __future__ import annotations

import types
from typing import Any

import pytest
from aiohttp import web
from conftest import base_config, bearer, mint
from pydantic import BaseModel, ConfigDict, Field
from yarl import URL

from scaiproxy import ConfigError, RouteSpec, hookimpl
from scaiproxy.app import PLUGINS, ROUTES, create_app
from scaiproxy.config import settings_from_mapping
from scaiproxy.routes import Call

JWKS = "http://127.0.0.1:9/jwks.json"


async def ok(call: Call) -> dict[str, Any]:
    return {"route": call.route.name}


class Recorder:
    """A plugin that records each lifecycle hook call in a shared list."""

    def __init__(
        self, name: str, events: list[tuple[str, str]], path: str = ""
    ) -> None:
        self.name = name
        self.events = events
        self.path = path or f"/v1/{name}"

    @hookimpl
    def scaiproxy_configure(self, block: dict[str, Any], settings: Any) -> dict:
        self.events.append(("configure", self.name))
        return {"block": dict(block)}

    @hookimpl
    def scaiproxy_routes(self, config: Any, settings: Any) -> list[RouteSpec]:
        self.events.append(("routes", self.name))
        return [RouteSpec("GET", self.path, ok, name=f"{self.name}.ping")]

    @hookimpl
    async def scaiproxy_startup(self, app: web.Application, config: Any) -> None:
        self.events.append(("startup", self.name))

    @hookimpl
    async def scaiproxy_shutdown(self, app: web.Application, config: Any) -> None:
        self.events.append(("shutdown", self.name))


def settings_for(
    enabled: list[str], upstream_url: str = "http://127.0.0.1:9", **blocks
):
    raw = base_config(upstream_url, JWKS, plugins={"enabled": enabled, **blocks})
    return settings_from_mapping(raw, environ={})


def build(enabled: list[str], plugins: dict[str, Any], **blocks) -> web.Application:
    return create_app(settings_for(enabled, **blocks), plugins=plugins, environ={})


def config_error(enabled: list[str], plugins: dict[str, Any], **blocks) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        build(enabled, plugins, **blocks)
    return caught.value


# --- order --------------------------------------------------------------------


async def test_hooks_follow_enabled_order(aiohttp_client):
    events: list[tuple[str, str]] = []
    names = ["gamma", "alpha", "beta"]
    plugins = {name: Recorder(name, events) for name in names}
    client = await aiohttp_client(build(names, plugins))
    await client.close()

    def order(hook: str) -> list[str]:
        return [name for kind, name in events if kind == hook]

    assert order("configure") == names
    assert order("routes") == names
    assert order("startup") == names
    assert order("shutdown") == list(reversed(names))


def test_routes_keep_enabled_order():
    events: list[tuple[str, str]] = []
    names = ["beta", "alpha"]
    app = build(names, {name: Recorder(name, events) for name in names})
    plugin_routes = [spec.name for spec in app[ROUTES] if spec.plugin != "core"]
    assert plugin_routes == ["beta.ping", "alpha.ping"]


def test_route_spec_names_plugin():
    app = build(["alpha"], {"alpha": Recorder("alpha", [])})
    spec = next(spec for spec in app[ROUTES] if spec.name == "alpha.ping")
    assert spec.plugin == "alpha"


async def test_config_block_reaches_plugin():
    events: list[tuple[str, str]] = []
    app = build(["alpha"], {"alpha": Recorder("alpha", events)}, alpha={"depth": 3})
    assert app[PLUGINS].configs["alpha"] == {"block": {"depth": 3}}


async def test_failed_startup_stops_app(aiohttp_client):
    events: list[tuple[str, str]] = []

    class Failing(Recorder):
        @hookimpl
        async def scaiproxy_startup(self, app: web.Application, config: Any) -> None:
            raise RuntimeError("cannot start")

    plugins = {"alpha": Recorder("alpha", events), "beta": Failing("beta", events)}
    with pytest.raises(RuntimeError, match="cannot start"):
        await aiohttp_client(build(["alpha", "beta"], plugins))
    assert ("startup", "alpha") in events
    assert ("shutdown", "alpha") in events
    assert ("shutdown", "beta") not in events


async def test_failed_shutdown_does_not_stop_others(aiohttp_client):
    events: list[tuple[str, str]] = []

    class Failing(Recorder):
        @hookimpl
        async def scaiproxy_shutdown(self, app: web.Application, config: Any) -> None:
            raise RuntimeError("cannot stop")

    plugins = {"alpha": Recorder("alpha", events), "beta": Failing("beta", events)}
    client = await aiohttp_client(build(["alpha", "beta"], plugins))
    await client.close()
    assert ("shutdown", "alpha") in events


async def test_sync_startup_hook_accepted(aiohttp_client):
    called = []

    class Sync:
        @hookimpl
        def scaiproxy_startup(self, app: web.Application, config: Any) -> None:
            called.append(app)

    client = await aiohttp_client(build(["sync"], {"sync": Sync()}))
    assert called == [client.app]


# --- hook checks --------------------------------------------------------------


def test_unknown_plugin_named():
    error = config_error(["alpha", "nope"], {"alpha": Recorder("alpha", [])})
    assert error.key == "plugins.enabled"
    assert "unknown plugin 'nope'" in error.message


def test_misspelt_hook_stops_startup():
    class Typo:
        @hookimpl
        def scaiproxy_rutes(self, config: Any, settings: Any) -> list[RouteSpec]:
            return []

    error = config_error(["typo"], {"typo": Typo()})
    assert "plugin 'typo'" in error.message
    assert "scaiproxy_rutes" in error.message


def test_misspelt_hook_in_module():
    module = types.ModuleType("typo_module")

    @hookimpl
    def scaiproxy_startpu(app: Any, config: Any) -> None:
        pass

    module.scaiproxy_startpu = scaiproxy_startpu
    error = config_error(["typo"], {"typo": module})
    assert "plugin 'typo'" in error.message
    assert "scaiproxy_startpu" in error.message


def test_wrong_argument_name_rejected():
    class WrongArgs:
        @hookimpl
        def scaiproxy_routes(self, cfg: Any, settings: Any) -> list[RouteSpec]:
            return []

    error = config_error(["wrong"], {"wrong": WrongArgs()})
    assert "plugin 'wrong'" in error.message
    assert "cfg" in error.message


def test_fewer_arguments_accepted():
    class Fewer:
        @hookimpl
        def scaiproxy_routes(self) -> list[RouteSpec]:
            return [RouteSpec("GET", "/v1/fewer", ok, name="fewer")]

    app = build(["fewer"], {"fewer": Fewer()})
    assert "fewer" in [spec.name for spec in app[ROUTES]]


def test_routes_hook_must_return_list():
    class NotList:
        @hookimpl
        def scaiproxy_routes(self, config: Any, settings: Any) -> Any:
            return RouteSpec("GET", "/v1/single", ok, name="single")

    error = config_error(["single"], {"single": NotList()})
    assert "plugin 'single'" in error.message
    assert "expected a list of RouteSpec" in error.message


def test_routes_hook_must_return_specs():
    class Dicts:
        @hookimpl
        def scaiproxy_routes(self, config: Any, settings: Any) -> Any:
            return [{"method": "GET", "path": "/v1/x"}]

    error = config_error(["dicts"], {"dicts": Dicts()})
    assert "expected RouteSpec objects" in error.message


def test_routes_hook_exception_named():
    class Broken:
        @hookimpl
        def scaiproxy_routes(self, config: Any, settings: Any) -> list[RouteSpec]:
            return [RouteSpec("FETCH", "/v1/x", ok, name="broken")]

    error = config_error(["broken"], {"broken": Broken()})
    assert "plugin 'broken' failed in scaiproxy_routes" in error.message
    assert "FETCH" in error.message


# --- route checks -------------------------------------------------------------


def test_route_collision_names_both_plugins():
    first = Recorder("first", [], path="/v1/items/{item_id}")
    second = Recorder("second", [], path="/v1/items/{other_id}")
    error = config_error(["first", "second"], {"first": first, "second": second})
    assert "'first'" in error.message
    assert "'second'" in error.message
    assert "collides" in error.message


def test_collision_with_core_route():
    error = config_error(["mine"], {"mine": Recorder("mine", [], path="/v1/me")})
    assert "'mine'" in error.message
    assert "'core'" in error.message


def test_same_path_other_method_allowed():
    class Poster:
        @hookimpl
        def scaiproxy_routes(self) -> list[RouteSpec]:
            return [RouteSpec("POST", "/v1/alpha", ok, name="alpha.post")]

    app = build(
        ["alpha", "poster"], {"alpha": Recorder("alpha", []), "poster": Poster()}
    )
    assert "alpha.post" in [spec.name for spec in app[ROUTES]]


def test_duplicate_route_name_names_both():
    class Twin:
        @hookimpl
        def scaiproxy_routes(self) -> list[RouteSpec]:
            return [RouteSpec("GET", "/v1/twin", ok, name="alpha.ping")]

    error = config_error(
        ["alpha", "twin"], {"alpha": Recorder("alpha", []), "twin": Twin()}
    )
    assert "route name 'alpha.ping'" in error.message
    assert "'twin'" in error.message
    assert "'alpha'" in error.message


def test_route_over_operational_path():
    raw = base_config("http://127.0.0.1:9", JWKS, server={"base_path": ""})
    raw["plugins"] = {"enabled": ["ops"]}
    settings = settings_from_mapping(raw, environ={})
    plugins = {"ops": Recorder("ops", [], path="/metrics")}
    with pytest.raises(ConfigError) as caught:
        create_app(settings, plugins=plugins, environ={})
    assert "operational route" in caught.value.message


def test_route_name_aiohttp_rejects():
    class Spaced:
        @hookimpl
        def scaiproxy_routes(self) -> list[RouteSpec]:
            return [RouteSpec("GET", "/v1/spaced", ok, name="has space")]

    error = config_error(["spaced"], {"spaced": Spaced()})
    assert "'has space'" in error.message
    assert "'spaced'" in error.message


def test_route_name_of_operational_route():
    class Named:
        @hookimpl
        def scaiproxy_routes(self) -> list[RouteSpec]:
            return [RouteSpec("GET", "/v1/named", ok, name="metrics")]

    error = config_error(["named"], {"named": Named()})
    assert "'metrics'" in error.message


def test_regex_path_parameter_rejected():
    with pytest.raises(ValueError, match="only"):
        RouteSpec("GET", "/v1/files/{path:.*}", ok, name="files")


# --- config blocks ------------------------------------------------------------


def test_block_for_plugin_not_enabled():
    error = config_error(["alpha"], {"alpha": Recorder("alpha", [])}, ghost={"a": 1})
    assert error.key == "plugins.ghost"
    assert "not in plugins.enabled" in error.message


def test_block_for_plugin_without_configure():
    class Plain:
        @hookimpl
        def scaiproxy_routes(self) -> list[RouteSpec]:
            return []

    error = config_error(["plain"], {"plain": Plain()}, plain={"depth": 3})
    assert error.key == "plugins.plain"
    assert "takes no configuration" in error.message


def test_block_not_mapping():
    error = config_error(["alpha"], {"alpha": Recorder("alpha", [])}, alpha=[1, 2])
    assert error.key == "plugins.alpha"
    assert "expected a mapping" in error.message


def test_configure_error_gets_prefix():
    class Strict:
        @hookimpl
        def scaiproxy_configure(self, block: dict[str, Any], settings: Any) -> Any:
            raise ConfigError("timeout_s", "expected a number, got 'abc'")

    error = config_error(["strict"], {"strict": Strict()}, strict={"timeout_s": "abc"})
    assert str(error) == "plugins.strict.timeout_s: expected a number, got 'abc'"


def test_configure_crash_named():
    class Crashing:
        @hookimpl
        def scaiproxy_configure(self, block: dict[str, Any], settings: Any) -> Any:
            return block["missing"]

    error = config_error(["crashing"], {"crashing": Crashing()})
    assert "plugin 'crashing' failed in scaiproxy_configure" in error.message
    assert "KeyError" in error.message


def test_scaicore_block_checked():
    error = config_error(["scaicore"], {}, scaicore={"invoke_timeout_s": "slow"})
    assert error.key == "plugins.scaicore.invoke_timeout_s"


# --- secret backends ----------------------------------------------------------


class MemoryStore:
    name = "memory"

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.closed = False

    async def get(self, path: str) -> str | None:
        return self.values.get(path)

    async def put(self, path: str, value: str) -> None:
        self.values[path] = value

    async def close(self) -> None:
        self.closed = True


class MemoryBackend:
    """A plugin adding the ``memory`` secret backend, seeded from its block."""

    def __init__(self) -> None:
        self.stores: list[MemoryStore] = []

    @hookimpl
    def scaiproxy_secret_backends(self) -> dict[str, Any]:
        def factory(block: dict[str, Any], context: Any) -> MemoryStore:
            store = MemoryStore(dict(block.get("seed", {})))
            self.stores.append(store)
            return store

        return {"memory": factory}


async def test_plugin_secret_backend_used(make_gateway, upstream, jwks_server, rsa_key):
    key = "sgk_" + "m" * 40
    backend = MemoryBackend()
    raw = base_config(
        upstream.base_url,
        jwks_server.url,
        auth={"upstream_credentials": "api_key"},
        secrets={
            "backend": "memory",
            "memory": {"seed": {"tenants/acme/scaigrid_api_key": key}},
        },
        plugins={"enabled": ["scaicore", "memory"]},
    )
    upstream.route(
        "GET",
        "/v1/modules/scaicore/events",
        json_body={"data": {"events": [], "next_cursor": None}},
    )
    client = await make_gateway(raw, plugins={"memory": backend})
    token = mint(rsa_key, permissions=["scaicore:view"])
    response = await client.get("/api/v1/scaicore/events", headers=bearer(token))
    assert response.status == 200
    assert upstream.last.headers["Authorization"] == f"Bearer {key}"
    await client.close()
    assert backend.stores[0].closed


def test_secret_backend_name_taken():
    class Shadow:
        @hookimpl
        def scaiproxy_secret_backends(self) -> dict[str, Any]:
            return {"file": lambda block, context: None}

    raw = base_config("http://127.0.0.1:9", JWKS, plugins={"enabled": ["shadow"]})
    raw["secrets"] = {"backend": "file"}
    settings = settings_from_mapping(raw, environ={})
    with pytest.raises(ConfigError) as caught:
        create_app(settings, plugins={"shadow": Shadow()}, environ={})
    assert "'file'" in caught.value.message
    assert "'shadow'" in caught.value.message
    assert "'core'" in caught.value.message


def test_misspelt_secrets_block():
    raw = base_config("http://127.0.0.1:9", JWKS)
    raw["secrets"] = {"backend": "file", "fiel": {"path": "var/s.json"}}
    settings = settings_from_mapping(raw, environ={})
    with pytest.raises(ConfigError) as caught:
        create_app(settings, environ={})
    assert caught.value.key == "secrets.fiel"
    assert "file, scaivault" in caught.value.message


def test_plugin_secrets_block_not_mapping():
    raw = base_config("http://127.0.0.1:9", JWKS, plugins={"enabled": ["memory"]})
    raw["secrets"] = {"backend": "memory", "memory": "seeded"}
    settings = settings_from_mapping(raw, environ={})
    with pytest.raises(ConfigError) as caught:
        create_app(settings, plugins={"memory": MemoryBackend()}, environ={})
    assert caught.value.key == "secrets.memory"
    assert "expected a mapping" in caught.value.message


def test_unknown_secret_backend():
    raw = base_config("http://127.0.0.1:9", JWKS, secrets={"backend": "vaultish"})
    settings = settings_from_mapping(raw, environ={})
    with pytest.raises(ConfigError) as caught:
        create_app(settings, environ={})
    assert caught.value.key == "secrets.backend"
    assert "vaultish" in caught.value.message


# --- a test plugin through the whole middleware chain -------------------------


class NoteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1)
    count: int = Field(1, ge=1, le=10)


class NoteQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dry_run: bool = False


class Notes:
    """An inline plugin with one POST route that needs ``notes:write``."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    @hookimpl
    def scaiproxy_configure(self, block: dict[str, Any], settings: Any) -> dict:
        return {"prefix": block.get("prefix", "note")}

    @hookimpl
    def scaiproxy_routes(self, config: dict, settings: Any) -> list[RouteSpec]:
        return [
            RouteSpec(
                "POST",
                "/v1/notes/{note_id}",
                self.handle,
                name="notes.write",
                permission="notes:write",
                body=NoteBody,
                query=NoteQuery,
            )
        ]

    async def handle(self, call: Call) -> dict[str, Any]:
        self.calls.append(call)
        return {
            "id": f"{call.config['prefix']}-{call.params['note_id']}",
            "text": call.body.text,
            "count": call.body.count,
            "dry_run": call.query.dry_run,
            "tenant_id": call.principal.tenant_id,
        }


@pytest.fixture
async def notes_gateway(make_gateway, upstream, jwks_server):
    notes = Notes()
    raw = base_config(
        upstream.base_url,
        jwks_server.url,
        plugins={"enabled": ["scaicore", "notes"], "notes": {"prefix": "n"}},
    )
    client = await make_gateway(raw, plugins={"notes": notes})
    return client, notes


async def test_test_plugin_served(notes_gateway, rsa_key):
    client, notes = notes_gateway
    token = mint(rsa_key, permissions=["notes:write"])
    response = await client.post(
        "/api/v1/notes/abc?dry_run=true",
        json={"text": "hello", "count": 2},
        headers=bearer(token),
    )
    assert response.status == 200
    assert await response.json() == {
        "data": {
            "id": "n-abc",
            "text": "hello",
            "count": 2,
            "dry_run": True,
            "tenant_id": "acme",
        }
    }
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["X-Request-ID"]


async def test_test_plugin_needs_token(notes_gateway):
    client, notes = notes_gateway
    response = await client.post("/api/v1/notes/abc", json={"text": "hello"})
    body = await response.json()
    assert response.status == 401
    assert body["detail"]["error"] == "missing_token"
    assert notes.calls == []


async def test_test_plugin_checks_permission(notes_gateway, rsa_key):
    client, notes = notes_gateway
    token = mint(rsa_key, permissions=["notes:read"])
    response = await client.post(
        "/api/v1/notes/abc", json={"text": "hello"}, headers=bearer(token)
    )
    body = await response.json()
    assert response.status == 403
    assert body["detail"]["error"] == "insufficient_scope"
    assert body["detail"]["required"] == "notes:write"
    assert notes.calls == []


async def test_test_plugin_validates_body(notes_gateway, rsa_key):
    client, notes = notes_gateway
    token = mint(rsa_key, permissions=["notes:write"])
    response = await client.post(
        "/api/v1/notes/abc",
        json={"text": "", "count": 99, "colour": "red"},
        headers=bearer(token),
    )
    body = await response.json()
    fields = {entry["field"] for entry in body["detail"]["errors"]}
    assert response.status == 422
    assert body["detail"]["error"] == "validation_error"
    assert fields == {"text", "count", "colour"}
    assert notes.calls == []


@pytest.mark.parametrize("note_id", ["%2E%2E", "a%20b", "a%2Fb", "x" * 129])
async def test_test_plugin_validates_path(notes_gateway, rsa_key, note_id):
    client, notes = notes_gateway
    token = mint(rsa_key, permissions=["notes:write"])
    url = URL(f"/api/v1/notes/{note_id}", encoded=True)
    response = await client.post(url, json={"text": "hello"}, headers=bearer(token))
    body = await response.json()
    assert response.status == 422
    assert body["detail"]["errors"][0]["location"] == "path"
    assert notes.calls == []


async def test_test_plugin_validates_query(notes_gateway, rsa_key):
    client, notes = notes_gateway
    token = mint(rsa_key, permissions=["notes:write"])
    response = await client.post(
        "/api/v1/notes/abc?dry_run=maybe", json={"text": "hello"}, headers=bearer(token)
    )
    body = await response.json()
    assert response.status == 422
    assert body["detail"]["errors"][0]["field"] == "dry_run"
    assert body["detail"]["errors"][0]["location"] == "query"


# --- one plugin manager per app -----------------------------------------------


async def test_apps_do_not_share_plugins(aiohttp_client):
    events: list[tuple[str, str]] = []
    first = build(["alpha"], {"alpha": Recorder("alpha", events)})
    second = build(["beta"], {"beta": Recorder("beta", events)})
    assert first[PLUGINS].manager is not second[PLUGINS].manager
    assert second[PLUGINS].manager.get_plugin("alpha") is None

    client = await aiohttp_client(second)
    response = await client.get("/api/v1/alpha")
    assert response.status == 404
    assert ("startup", "alpha") not in events
    assert ("startup", "beta") in events


def test_same_plugin_object_in_two_apps():
    plugin = Recorder("alpha", [])
    first = build(["alpha"], {"alpha": plugin})
    second = build(["alpha"], {"alpha": plugin})
    assert first[PLUGINS].manager.get_plugin("alpha") is plugin
    assert second[PLUGINS].manager.get_plugin("alpha") is plugin
