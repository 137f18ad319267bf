"""The app factory: plugins, routes, middleware and the shared services."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from scaiproxy import __version__, jsonutil, protocol
from scaiproxy.auth import JWKSCache, Principal, TokenVerifier, dev_principal
from scaiproxy.config import Settings
from scaiproxy.credentials import CredentialResolver
from scaiproxy.dispatch import make_handler
from scaiproxy.errors import SERVICE_UNAVAILABLE, ConfigError, ProxyError
from scaiproxy.metrics import CONTENT_TYPE, Metrics
from scaiproxy.middleware import error_response, json_response, middlewares
from scaiproxy.openapi import build_openapi
from scaiproxy.pages import CHECKED_PAGES, CHECKED_PAGES_MAX_BYTES, CheckedPages
from scaiproxy.plugins import PluginHost
from scaiproxy.routes import RouteSpec
from scaiproxy.secrets import SecretBackendContext, SecretStore, TenantSecretCache
from scaiproxy.upstream import UpstreamClient

log = structlog.get_logger("scaiproxy.app")

SETTINGS = web.AppKey("settings", Settings)
PLUGINS = web.AppKey("plugins", PluginHost)
PLUGIN_CONFIGS = web.AppKey("plugin_configs", dict)
ROUTES = web.AppKey("routes", list)
METRICS = web.AppKey("metrics", Metrics)
SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", UpstreamClient)
VERIFIER = web.AppKey("verifier", TokenVerifier)
DEV_PRINCIPAL = web.AppKey("dev_principal", Principal)
RESOLVER = web.AppKey("resolver", CredentialResolver)
SECRETS = web.AppKey("secrets", TenantSecretCache)
STATE = web.AppKey("state", dict)


def create_app(
    settings: Settings,
    *,
    plugins: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> web.Application:
    """Build the gateway app; raises :class:`ConfigError` for any config problem.

    ``plugins`` maps plugin names to plugin objects used in place of installed
    entry points with the same name (tests register inline plugins this way); a
    name still has to be listed in ``plugins.enabled``.
    """
    environ = os.environ if environ is None else environ
    protocol.install()
    host = PluginHost(settings, plugins)
    configs = host.configure()
    specs = host.routes()
    metrics = Metrics()

    app = web.Application(
        middlewares=middlewares(metrics),
        client_max_size=settings.server.max_body_bytes,
        handler_args={"max_field_size": 16384, "max_line_size": 16384},
    )
    app[SETTINGS] = settings
    app[PLUGINS] = host
    app[PLUGIN_CONFIGS] = configs
    app[ROUTES] = specs
    app[METRICS] = metrics
    app[STATE] = {"ready": False}
    app[CHECKED_PAGES] = CheckedPages(CHECKED_PAGES_MAX_BYTES)

    store = _secret_store(settings, host, environ, app)
    secrets = TenantSecretCache(store, settings.secrets.cache_ttl_s)
    app[SECRETS] = secrets
    app[RESOLVER] = CredentialResolver(settings, secrets, environ)
    if settings.auth.mode == "disabled":
        app[DEV_PRINCIPAL] = dev_principal(settings.auth)

    _add_operational_routes(app, settings, specs)
    base = settings.server.base_path
    operational = {"/healthz", "/readyz", "/metrics", settings.server.openapi_path}
    for spec in specs:
        if base + spec.path in operational:
            raise ConfigError(
                "plugins.enabled",
                f"route {spec.name!r} of plugin {spec.plugin!r} uses the path "
                f"{base + spec.path}, which an operational route serves",
            )
        try:
            app.router.add_route(
                spec.method,
                base + spec.path,
                make_handler(spec),
                name=spec.name,
                expect_handler=protocol.expect_handler,
            )
        except (ValueError, RuntimeError) as exc:
            # aiohttp rejects names that are not identifiers, names already
            # taken by an operational route, and paths it cannot parse.
            raise ConfigError(
                "plugins.enabled",
                f"route {spec.name!r} ({spec.method} {base + spec.path}) of plugin "
                f"{spec.plugin!r} cannot be registered: {exc}",
            ) from None
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_mark_not_ready)
    return app


def _secret_store(
    settings: Settings,
    host: PluginHost,
    environ: Mapping[str, str],
    app: web.Application,
) -> SecretStore | None:
    name = settings.secrets.backend
    backends = host.secret_backends()
    # secrets.<name> blocks are open for plugin backends, so a misspelt block
    # name is caught here, once the backends are known.
    for block, value in (settings.secrets.model_extra or {}).items():
        if block not in backends:
            raise ConfigError(
                f"secrets.{block}",
                f"unknown key; no secret backend is named {block!r} (available: "
                f"{', '.join(sorted(backends))})",
            )
        if value is not None and not isinstance(value, Mapping):
            raise ConfigError(
                f"secrets.{block}",
                f"expected a mapping of the backend's settings, got {value!r:.80}",
            )
    if name == "none":
        return None
    if name not in backends:
        raise ConfigError(
            "secrets.backend",
            f"unknown secret backend {name!r}; available: "
            f"{', '.join(sorted([*backends, 'none']))}",
        )
    context = SecretBackendContext(environ=environ, session=lambda: app[SESSION])
    return backends[name](settings.secrets.block(name), context)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    session = UpstreamClient.create_session(settings.upstream)
    app[SESSION] = session
    app[UPSTREAM] = UpstreamClient(
        settings.upstream, session, app[METRICS], settings.server.base_path
    )
    if settings.auth.mode == "scaikey":
        jwks = JWKSCache(settings.auth, session) if settings.auth.jwks_url else None
        app[VERIFIER] = TokenVerifier(settings.auth, jwks)
    else:
        log.warning(
            "authentication_disabled",
            message="auth.mode is disabled: every request is served as the "
            "configured dev principal; never use this outside development",
            tenant_id=settings.auth.dev_principal.tenant_id,
        )
    host = app[PLUGINS]
    try:
        await host.startup(app)
        # Connections inherit this task's context: a field that start-up code
        # bound would otherwise appear on the log lines of every request.
        structlog.contextvars.clear_contextvars()
        app[STATE]["ready"] = True
        log.info(
            "gateway_started",
            version=__version__,
            plugins=host.order,
            routes=len(app[ROUTES]),
            environment=settings.environment,
            upstream_credentials=app[RESOLVER].mode,
        )
        yield
    finally:
        app[STATE]["ready"] = False
        await host.shutdown(app)
        store = app[SECRETS].store
        if store is not None:
            await store.close()
        await session.close()
        log.info("gateway_stopped")


async def _mark_not_ready(app: web.Application) -> None:
    app[STATE]["ready"] = False
    # Handlers cancelled from now on are cut off by the shutdown, not by clients.
    app[STATE]["stopping"] = True


def _add_operational_routes(
    app: web.Application, settings: Settings, specs: list[RouteSpec]
) -> None:
    document: dict[str, bytes] = {}

    async def healthz(request: web.Request) -> web.Response:
        return json_response(200, b'{"data":{"status":"ok"}}')

    async def readyz(request: web.Request) -> web.Response:
        session = request.app.get(SESSION)
        if request.app[STATE]["ready"] and session is not None and not session.closed:
            return json_response(200, b'{"data":{"status":"ready"}}')
        return error_response(
            ProxyError(
                503,
                SERVICE_UNAVAILABLE,
                "The gateway is starting or stopping.",
                headers={"Retry-After": "1"},
            )
        )

    async def metrics(request: web.Request) -> web.Response:
        body = request.app[METRICS].render()
        response = web.Response(body=body)
        response.headers["Content-Type"] = CONTENT_TYPE
        return response

    async def openapi(request: web.Request) -> web.Response:
        if "body" not in document:
            document["body"] = jsonutil.dumps(build_openapi(settings, specs))
        return json_response(200, document["body"])

    expect = protocol.expect_handler
    app.router.add_get("/healthz", healthz, name="healthz", expect_handler=expect)
    app.router.add_get("/readyz", readyz, name="readyz", expect_handler=expect)
    app.router.add_get("/metrics", metrics, name="metrics", expect_handler=expect)
    app.router.add_get(
        settings.server.openapi_path, openapi, name="openapi", expect_handler=expect
    )
