"""Hold many idle keep-alive connections open to one server.

Run by bench.py as a separate process: opens ``--count`` connections, sends one
GET on each and reads the response, prints ``ready OPEN FAILED`` on stdout, then
keeps every connection open until stdin closes or ``--hold-s`` passes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys


async def _one_request(
    host: str, port: int, request: bytes, timeout_s: float
) -> asyncio.StreamWriter | None:
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port), timeout_s
        )
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        length = 0
        for line in header_lines:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        await asyncio.wait_for(reader.readexactly(length), timeout_s)
        if status_line.split()[1] != "200":
            writer.close()
            return None
        return writer
    except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
        return None


async def hold(args: argparse.Namespace) -> int:
    lines = [f"GET {args.path} HTTP/1.1", f"Host: {args.host}:{args.port}"]
    lines += args.header
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    limit = asyncio.Semaphore(args.parallel)

    async def open_one() -> asyncio.StreamWriter | None:
        async with limit:
            return await _one_request(args.host, args.port, request, args.timeout_s)

    results = await asyncio.gather(*(open_one() for _ in range(args.count)))
    writers = [writer for writer in results if writer is not None]
    print(f"ready {len(writers)} {args.count - len(writers)}", flush=True)

    # The parent closes stdin (or sends a line) when it has taken its reading.
    loop = asyncio.get_running_loop()
    released = asyncio.Event()
    loop.add_reader(sys.stdin.fileno(), released.set)
    try:
        await asyncio.wait_for(released.wait(), args.hold_s)
    except TimeoutError:
        pass
    loop.remove_reader(sys.stdin.fileno())
    for writer in writers:
        writer.close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True, help="path and query of the GET")
    parser.add_argument(
        "--header", action="append", default=[], help="'Name: value', repeatable"
    )
    parser.add_argument("--count", type=int, default=1000, help="connections to open")
    parser.add_argument(
        "--parallel", type=int, default=100, help="connections opened at once"
    )
    parser.add_argument(
        "--timeout-s", type=float, default=10.0, help="seconds per connect or read"
    )
    parser.add_argument(
        "--hold-s", type=float, default=60.0, help="seconds to hold at most"
    )
    return asyncio.run(hold(parser.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
