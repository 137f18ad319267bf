"""scaiproxy: a plugin-based reverse proxy between the ScaiFlow canvas and ScaiGrid."""

import pluggy

__version__ = "0.1.0"

#: Marker for hook implementations in plugins: ``@scaiproxy.hookimpl``.
hookimpl = pluggy.HookimplMarker("scaiproxy")

from scaiproxy.errors import ConfigError, ProxyError  # noqa: E402
from scaiproxy.routes import Call, RawJSON, RouteSpec  # noqa: E402

__all__ = [
    "Call",
    "ConfigError",
    "ProxyError",
    "RawJSON",
    "RouteSpec",
    "__version__",
    "hookimpl",
]
