"""The hooks a scaiproxy plugin may implement, grouped by lifecycle phase.

Implement a hook with ``@scaiproxy.hookimpl`` on a function of the same name in
the plugin module. Every hook is called plugin by plugin: the core's own plugin
first, then the plugins in the order of ``plugins.enabled`` (shutdown in
reverse). Hooks that receive ``config`` get that plugin's own parsed config:
the value its ``scaiproxy_configure`` returned. docs/hooks.md describes each
hook with an example.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from aiohttp import web

    from scaiproxy.config import Settings
    from scaiproxy.routes import RouteSpec
    from scaiproxy.secrets import SecretBackendFactory

_hookspec = pluggy.HookspecMarker("scaiproxy")


# Start-up and config


@_hookspec
def scaiproxy_configure(block: Mapping[str, Any], settings: Settings) -> Any:
    """Validate the plugin's own config block and return the parsed config.

    Called once at start-up, before routes are collected.

    :param block: the ``plugins.<name>`` mapping from the YAML, ``{}`` when absent.
    :param settings: the gateway's validated settings.

    Raise :class:`scaiproxy.ConfigError` with the key inside the block; the core
    prefixes ``plugins.<name>.``. The return value is passed as ``config`` to the
    plugin's other hooks and to its handlers (``call.config``). A plugin without
    this hook must have no config block.
    """


@_hookspec
def scaiproxy_secret_backends() -> Mapping[str, SecretBackendFactory]:
    """Return secret store backends, by the name ``secrets.backend`` selects.

    Called once when the app is built, unless ``secrets.backend`` is ``none``.
    Only the selected backend's factory is called, as ``factory(block, context)``
    with the ``secrets.<name>`` block and a
    :class:`scaiproxy.secrets.SecretBackendContext`; it returns an object with
    async ``get(path)``, ``put(path, value)`` and ``close()``. Return ``None`` or
    ``{}`` to add none. A name that two plugins return stops the start-up.
    """


# Route registration


@_hookspec
def scaiproxy_routes(config: Any, settings: Settings) -> list[RouteSpec]:
    """Return the plugin's routes as :class:`scaiproxy.RouteSpec` objects.

    Called once when the app is built, after ``scaiproxy_configure``.

    :param config: what the plugin's ``scaiproxy_configure`` returned, or ``None``.
    :param settings: the gateway's validated settings.

    Return ``None`` or ``[]`` for no routes. Paths are relative to
    ``server.base_path``. The core rejects two routes with the same method and
    path shape, or the same name, naming both plugins.
    """


# Running and shutdown


@_hookspec
async def scaiproxy_startup(app: web.Application, config: Any) -> None:
    """Prepare what the plugin needs at run time; awaited when the app starts.

    Called after the shared upstream session is open, in ``plugins.enabled`` order.
    An exception stops the start-up; the plugins started before it are shut down.
    A plain function may implement it too.
    """


@_hookspec
async def scaiproxy_shutdown(app: web.Application, config: Any) -> None:
    """Release what ``scaiproxy_startup`` acquired; awaited when the app stops.

    Called in reverse ``plugins.enabled`` order for each plugin whose start-up
    completed, before the upstream session is closed. Exceptions are logged and
    do not stop the other plugins' shutdown.
    """
