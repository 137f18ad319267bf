"""Loading plugins through pluggy and collecting what they provide."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

import pluggy
import structlog

from scaiproxy import hookspecs
from scaiproxy.config import Settings
from scaiproxy.errors import ConfigError
from scaiproxy.routes import RouteSpec

log = structlog.get_logger("scaiproxy.plugins")

ENTRY_POINT_GROUP = "scaiproxy"
#: The core's own plugin: always registered, never listed in ``plugins.enabled``.
CORE_PLUGIN = "core"


def available_plugins() -> dict[str, Any]:
    """Return the installed plugins' entry points, by name."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


class PluginHost:
    """The plugin manager of one app, and the per-plugin calls the core makes.

    pluggy calls an ordinary hook on every plugin with the same arguments. The
    hooks that take a plugin's own ``config`` are instead called plugin by plugin,
    in ``plugins.enabled`` order, through ``subset_hook_caller``.
    """

    def __init__(
        self, settings: Settings, extra_plugins: Mapping[str, Any] | None = None
    ) -> None:
        self.settings = settings
        self.manager = pluggy.PluginManager("scaiproxy")
        self.manager.add_hookspecs(hookspecs)
        self.order: list[str] = []
        self.configs: dict[str, Any] = {}
        #: Plugins whose start-up hook completed, in the order it ran.
        self.started: list[str] = []

        from scaiproxy import builtins

        self._register(CORE_PLUGIN, builtins)
        installed = available_plugins()
        extra = dict(extra_plugins or {})
        for name in settings.plugins.enabled:
            if name in extra:
                plugin = extra[name]
            elif name in installed:
                try:
                    plugin = installed[name].load()
                except Exception as exc:  # noqa: BLE001 - any import failure
                    raise ConfigError(
                        "plugins.enabled",
                        f"plugin {name!r} failed to load: {type(exc).__name__}: {exc}",
                    ) from None
            else:
                known = sorted(set(installed) | set(extra))
                raise ConfigError(
                    "plugins.enabled",
                    f"unknown plugin {name!r}; installed plugins: "
                    f"{', '.join(known) or 'none'}",
                )
            self._register(name, plugin)
            self.order.append(name)

        try:
            self.manager.check_pending()
        except pluggy.PluginValidationError as exc:
            raise ConfigError(
                "plugins.enabled",
                f"plugin {self._plugin_name(exc.plugin)!r} implements an unknown "
                f"hook: {exc}",
            ) from None

        for name, block in settings.plugins.blocks().items():
            if name not in self.order:
                raise ConfigError(
                    f"plugins.{name}",
                    f"config block for plugin {name!r}, which is not in "
                    "plugins.enabled; enable it or remove the block",
                )
            if block is not None and not isinstance(block, Mapping):
                raise ConfigError(
                    f"plugins.{name}",
                    f"expected a mapping of the plugin's settings, got {block!r:.80}",
                )

    def _register(self, name: str, plugin: Any) -> None:
        try:
            self.manager.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise ConfigError(
                "plugins.enabled",
                f"plugin {name!r} does not match the hook specs: {exc}",
            ) from None
        except ValueError as exc:
            raise ConfigError("plugins.enabled", f"plugin {name!r}: {exc}") from None

    def _plugin_name(self, plugin: Any) -> str:
        return self.manager.get_name(plugin) or repr(plugin)

    def call_one(self, name: str, hook_name: str, **kwargs: Any) -> list[Any]:
        """Call a hook on one plugin only; return its results (at most one)."""
        others = [
            plugin for other, plugin in self.manager.list_name_plugin() if other != name
        ]
        caller = self.manager.subset_hook_caller(hook_name, remove_plugins=others)
        return caller(**kwargs)

    def has_hook(self, name: str, hook_name: str) -> bool:
        plugin = self.manager.get_plugin(name)
        hook = getattr(self.manager.hook, hook_name)
        return any(impl.plugin is plugin for impl in hook.get_hookimpls())

    def configure(self) -> dict[str, Any]:
        """Give each plugin its config block; returns the parsed configs by name."""
        for name in [CORE_PLUGIN, *self.order]:
            block = self.settings.plugins.block(name) if name != CORE_PLUGIN else {}
            if not self.has_hook(name, "scaiproxy_configure"):
                if block:
                    raise ConfigError(
                        f"plugins.{name}", f"plugin {name!r} takes no configuration"
                    )
                self.configs[name] = None
                continue
            try:
                results = self.call_one(
                    name, "scaiproxy_configure", block=block, settings=self.settings
                )
            except ConfigError as exc:
                raise exc.under(f"plugins.{name}") from None
            except Exception as exc:  # noqa: BLE001 - a plugin bug, named at start-up
                raise _hook_failed(name, "scaiproxy_configure", exc) from exc
            self.configs[name] = results[0] if results else None
        return self.configs

    def routes(self) -> list[RouteSpec]:
        """Collect every plugin's routes, checking names and collisions."""
        collected: list[RouteSpec] = []
        seen_shapes: dict[tuple[str, str], RouteSpec] = {}
        seen_names: dict[str, RouteSpec] = {}
        for name in [CORE_PLUGIN, *self.order]:
            try:
                results = self.call_one(
                    name,
                    "scaiproxy_routes",
                    config=self.configs.get(name),
                    settings=self.settings,
                )
            except ConfigError:
                raise
            except Exception as exc:  # noqa: BLE001 - a plugin bug, named at start-up
                raise _hook_failed(name, "scaiproxy_routes", exc) from exc
            for specs in results:
                if specs is not None and not isinstance(specs, list | tuple):
                    raise ConfigError(
                        "plugins.enabled",
                        f"plugin {name!r} returned {type(specs).__name__} from "
                        "scaiproxy_routes; expected a list of RouteSpec objects",
                    )
                for spec in specs or ():
                    if not isinstance(spec, RouteSpec):
                        raise ConfigError(
                            "plugins.enabled",
                            f"plugin {name!r} returned {spec!r} from scaiproxy_routes; "
                            "expected RouteSpec objects",
                        )
                    spec = _with_plugin(spec, name)
                    key = (spec.method, spec.shape)
                    if key in seen_shapes:
                        other = seen_shapes[key]
                        raise ConfigError(
                            "plugins.enabled",
                            f"route {spec.method} {spec.path} of plugin {name!r} "
                            f"collides with {other.method} {other.path} of plugin "
                            f"{other.plugin!r}",
                        )
                    if spec.name in seen_names:
                        raise ConfigError(
                            "plugins.enabled",
                            f"route name {spec.name!r} of plugin {name!r} is already "
                            f"used by plugin {seen_names[spec.name].plugin!r}",
                        )
                    seen_shapes[key] = spec
                    seen_names[spec.name] = spec
                    collected.append(spec)
        return collected

    def secret_backends(self) -> dict[str, Any]:
        """Collect the secret backends by name, rejecting a name given twice."""
        backends: dict[str, Any] = {}
        owners: dict[str, str] = {}
        for name in [CORE_PLUGIN, *self.order]:
            for result in self.call_one(name, "scaiproxy_secret_backends"):
                for backend in result or {}:
                    if backend in owners:
                        raise ConfigError(
                            "plugins.enabled",
                            f"secret backend {backend!r} of plugin {name!r} is "
                            f"already provided by plugin {owners[backend]!r}",
                        )
                    owners[backend] = name
                    backends[backend] = result[backend]
        return backends

    async def startup(self, app: Any) -> None:
        """Await each plugin's start-up hook, in ``plugins.enabled`` order."""
        self.started = []
        for name in [CORE_PLUGIN, *self.order]:
            for result in self.call_one(
                name, "scaiproxy_startup", app=app, config=self.configs.get(name)
            ):
                if inspect.isawaitable(result):
                    await result
            self.started.append(name)

    async def shutdown(self, app: Any) -> None:
        """Await the shutdown hooks of the started plugins, in reverse order."""
        # A plugin whose start-up failed or never ran has nothing to release.
        for name in reversed(self.started):
            try:
                for result in self.call_one(
                    name, "scaiproxy_shutdown", app=app, config=self.configs.get(name)
                ):
                    if inspect.isawaitable(result):
                        await result
            except Exception:  # noqa: BLE001 - one plugin must not stop the rest
                log.exception("plugin_shutdown_failed", plugin=name)


def _hook_failed(name: str, hook: str, exc: Exception) -> ConfigError:
    return ConfigError(
        "plugins.enabled",
        f"plugin {name!r} failed in {hook}: {type(exc).__name__}: {exc}",
    )


def _with_plugin(spec: RouteSpec, plugin: str) -> RouteSpec:
    from dataclasses import replace

    return replace(spec, plugin=plugin)
