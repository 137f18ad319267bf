"""The Simulator: state, runtime and the aiohttp app that serves them."""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
from collections.abc import AsyncIterator, Iterable
from typing import Any

from aiohttp import web

from scaiproxy.simulator import activity
from scaiproxy.simulator.control_routes import add_control_routes
from scaiproxy.simulator.middleware import (
    SIMULATOR_KEY,
    RateLimiter,
    create_simulator_middleware,
    new_request_log,
)
from scaiproxy.simulator.options import SimOptions
from scaiproxy.simulator.runtime import Runtime
from scaiproxy.simulator.scaigrid_routes import add_scaigrid_routes
from scaiproxy.simulator.scaikey import (
    DEFAULT_PERMISSIONS,
    DEFAULT_ROLES,
    ScaiKeyStandIn,
)
from scaiproxy.simulator.stand_in_routes import add_stand_in_routes
from scaiproxy.simulator.state import SimState

#: Format of ScaiGrid API keys: ``sgk_`` and at least 32 URL-safe characters.
API_KEY_PATTERN = re.compile(r"sgk_[A-Za-z0-9_-]{32,}")
#: ScaiVault path of each tenant's ScaiGrid API key.
TENANT_KEY_SECRET = "tenants/{tenant_id}/scaigrid_api_key"

JWKS_PATH = "/scaikey/api/v1/platform/.well-known/jwks.json"
VAULT_PATH = "/scaivault"
MAX_REQUEST_BYTES = 1024 * 1024

_KEY_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


class Simulator:
    """ScaiGrid, ScaiKey and ScaiVault stand-ins served by one aiohttp app.

    The seeded tenants "acme" and "globex" exist from the start, each with cores,
    a short history of executions, scopes, bunkers, an API key in
    :attr:`demo_api_keys` and that key stored in the vault. Any other tenant is
    created with the default demo data the first time a credential names it.
    """

    def __init__(self, options: SimOptions | None = None) -> None:
        self.options = options or SimOptions()
        seed = self.options.seed
        self.state = SimState(seed=seed)
        self.runtime = Runtime(self.state, random.Random(seed))
        self.scaikey = ScaiKeyStandIn(self.options)
        self.rate_limiter = RateLimiter()
        self.fault_rng = random.Random(f"{seed}:faults")
        self.recorded_requests = new_request_log()
        self._activity_rng = random.Random(f"{seed}:activity")

        key_rng = random.Random(f"{seed}:api-keys")
        self.demo_api_keys: dict[str, str] = {}
        for tenant_id in activity.SEEDED_TENANTS:
            api_key = "sgk_" + "".join(key_rng.choices(_KEY_ALPHABET, k=40))
            self.demo_api_keys[tenant_id] = api_key
            self.add_api_key(api_key, tenant_id)
            self.put_secret(
                TENANT_KEY_SECRET.format(tenant_id=tenant_id),
                {"value": api_key},
                "api_key",
            )
            activity.seed_history(self.runtime, tenant_id)

        self._app: web.Application | None = None
        self._runner: web.AppRunner | None = None
        self._base_url: str | None = None

    # --- in-process access --------------------------------------------------------

    def add_api_key(self, api_key: str, tenant_id: str) -> None:
        """Accept ``api_key`` as a credential for ``tenant_id`` from now on.

        Raises ValueError unless the key is ``sgk_`` and 32 or more characters of
        ``[A-Za-z0-9_-]``.
        """
        if not API_KEY_PATTERN.fullmatch(api_key):
            raise ValueError(
                "expected sgk_ followed by at least 32 characters of A-Z, a-z, 0-9, "
                "'_' or '-'"
            )
        self.state.api_keys[api_key] = tenant_id
        self.state.tenant(tenant_id)

    def mint_token(
        self,
        tenant_id: str,
        sub: str = "user-1",
        roles: Iterable[str] = DEFAULT_ROLES,
        permissions: Iterable[str] = DEFAULT_PERMISSIONS,
        ttl_s: int = 3600,
        **claims: Any,
    ) -> str:
        """Sign an RS256 access token that the ScaiGrid routes accept.

        ``claims`` add to or replace the standard claims, so ``iss="other"`` or
        ``aud="other"`` make a token the simulator rejects.
        """
        return self.scaikey.mint(tenant_id, sub, roles, permissions, ttl_s, **claims)

    def invoke(
        self,
        tenant_id: str,
        core_id: str,
        input: dict[str, Any],
        entity_id: str | None = None,
    ) -> dict[str, Any]:
        """Invoke a core in-process, as ``POST .../cores/{core_id}/invoke`` does."""
        return self.runtime.invoke(tenant_id, core_id, input, entity_id)

    def put_secret(
        self, path: str, data: dict[str, Any], secret_type: str = "generic"
    ) -> dict[str, Any]:
        """Write a ScaiVault secret, raising its version by one, and return it."""
        now = self.runtime.now()
        previous = self.state.secrets.get(path)
        secret = {
            "path": path,
            "secret_type": secret_type,
            "version": previous["version"] + 1 if previous else 1,
            "data": data,
            "created_at": previous["created_at"] if previous else now,
            "updated_at": now,
        }
        self.state.secrets[path] = secret
        return secret

    # --- serving ------------------------------------------------------------------

    def app(self) -> web.Application:
        """Return the simulator's aiohttp app, built on the first call."""
        if self._app is None:
            app = web.Application(
                middlewares=[create_simulator_middleware(self)],
                client_max_size=MAX_REQUEST_BYTES,
            )
            app[SIMULATOR_KEY] = self
            add_scaigrid_routes(app)
            add_stand_in_routes(app)
            add_control_routes(app)
            app.cleanup_ctx.append(self._background_activity)
            self._app = app
        return self._app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve the app on ``host:port`` and return the base URL.

        Port 0 picks a free port.
        """
        if self._runner is not None:
            raise RuntimeError("the simulator is already running; call stop() first")
        runner = web.AppRunner(self.app())
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_port = runner.addresses[0][1]
        url_host = f"[{host}]" if ":" in host else host
        self._base_url = f"http://{url_host}:{bound_port}"
        return self._base_url

    async def stop(self) -> None:
        """Stop serving; does nothing when the simulator is not running."""
        if self._runner is None:
            return
        runner, self._runner = self._runner, None
        self._base_url = None
        await runner.cleanup()

    @property
    def base_url(self) -> str:
        if self._base_url is None:
            raise RuntimeError(
                "base_url is set by start(); the simulator is not running"
            )
        return self._base_url

    @property
    def jwks_url(self) -> str:
        return self.base_url + JWKS_PATH

    @property
    def vault_url(self) -> str:
        return self.base_url + VAULT_PATH

    async def _background_activity(self, app: web.Application) -> AsyncIterator[None]:
        task = None
        if self.options.activity_interval_s is not None:
            task = asyncio.create_task(
                activity.run_background_activity(
                    self.runtime, self.options, self._activity_rng
                ),
                name="scaiproxy-simulator-activity",
            )
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
