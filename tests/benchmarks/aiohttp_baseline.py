"""The minimum an aiohttp reverse proxy does, as a floor for scaiproxy's figures.

One shared ClientSession, the gateway's two GET paths, ``limit`` passed on, the
tenant key and a new ``X-Request-ID`` sent upstream, and the body returned as
it came. No token check, validation, envelope, logging or metrics. It runs on
uvloop when uvloop is installed, as scaiproxy does.

With ``--cached`` it calls the upstream once per path and query and then
responds to every request with the stored body: the most that an aiohttp server can
do on this machine, whatever the gateway behind it does.
"""

from __future__ import annotations

import argparse
import asyncio
import uuid

import aiohttp
from aiohttp import web
from fixtures import API_KEY

UPSTREAM_PATHS = {
    "/api/v1/scaicore/events": "/v1/modules/scaicore/events",
    "/api/v1/scaigrid/models": "/v1/models",
}
SESSION = web.AppKey("session", aiohttp.ClientSession)


async def _session(app: web.Application):
    connector = aiohttp.TCPConnector(limit=100, keepalive_timeout=30)
    async with aiohttp.ClientSession(connector=connector) as session:
        app[SESSION] = session
        yield


def make_app(upstream: str, cached: bool = False) -> web.Application:
    stored_bodies: dict[str, bytes] = {}

    async def forward(request: web.Request) -> web.Response:
        request_id = uuid.uuid4().hex
        if cached and request.path_qs in stored_bodies:
            return web.Response(
                body=stored_bodies[request.path_qs],
                content_type="application/json",
                headers={"X-Request-ID": request_id},
            )
        params = {"limit": request.query["limit"]} if "limit" in request.query else None
        async with request.app[SESSION].get(
            upstream + UPSTREAM_PATHS[request.path],
            params=params,
            headers={"Authorization": f"Bearer {API_KEY}", "X-Request-ID": request_id},
        ) as response:
            body = await response.read()
            if cached and response.status == 200:
                stored_bodies[request.path_qs] = body
            return web.Response(
                status=response.status,
                body=body,
                content_type="application/json",
                headers={"X-Request-ID": request_id},
            )

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.cleanup_ctx.append(_session)
    for path in UPSTREAM_PATHS:
        app.router.add_get(path, forward)
    app.router.add_get("/healthz", healthz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL of the upstream")
    parser.add_argument(
        "--cached", action="store_true", help="respond with the first upstream body"
    )
    args = parser.parse_args()
    web.run_app(
        make_app(args.upstream.rstrip("/"), args.cached),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        loop=new_event_loop(),
    )


def new_event_loop() -> asyncio.AbstractEventLoop:
    """Return a uvloop event loop where uvloop is installed, as scaiproxy runs on."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


if __name__ == "__main__":
    main()
