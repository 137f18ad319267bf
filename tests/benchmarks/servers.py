"""The processes of a benchmark run: two nginx instances and the gateways.

Every process starts in its own session (so its own process group) and is
registered with a :class:`Processes` instance, which ends every group it
started, also when the run is interrupted.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml
from fixtures import API_KEY, AUDIENCE, ISSUER

HOST = "127.0.0.1"
#: nginx closes a keep-alive connection after this many requests; wrk would
#: otherwise count a reconnect now and then.
_KEEPALIVE_REQUESTS = 100_000_000


class BenchError(RuntimeError):
    """A benchmark step failed; the message names the step and what to check."""


def free_port() -> int:
    """Return a loopback port that is free now (another process may take it later)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@dataclass
class Processes:
    """The processes started by this run, each the leader of its own group."""

    started: list[subprocess.Popen] = field(default_factory=list)

    def start(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdout: IO[Any] | int | None = subprocess.DEVNULL,
        stderr: IO[Any] | int | None = subprocess.DEVNULL,
        stdin: IO[Any] | int | None = subprocess.DEVNULL,
    ) -> subprocess.Popen:
        process = subprocess.Popen(
            list(argv),
            env=dict(env) if env is not None else None,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
        self.started.append(process)
        return process

    def stop(self, process: subprocess.Popen, timeout_s: float = 10.0) -> None:
        """Send SIGTERM to the process's group, then SIGKILL after ``timeout_s``."""
        if process.returncode is None:
            _signal_group(process.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while not _exited(process.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            # The leader is alive or not yet reaped, so the group id is still ours.
            _signal_group(process.pid, signal.SIGKILL)
            process.wait(10)
        elif _group_has_members(process.pid):
            # Children that outlived their reaped leader keep the group id in use.
            _signal_group(process.pid, signal.SIGKILL)
        if process in self.started:
            self.started.remove(process)

    def stop_all(self) -> None:
        for process in reversed(list(self.started)):
            try:
                self.stop(process)
            except (OSError, subprocess.TimeoutExpired):
                pass


def _exited(pid: int) -> bool:
    """Tell whether a child has exited, without reaping it."""
    try:
        flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
        return os.waitid(os.P_PID, pid, flags) is not None
    except ChildProcessError:
        return True


def _group_has_members(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the command name: state, ppid, pgrp, ...
        if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:
            return True
    return False


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def wait_http(
    port: int,
    path: str,
    process: subprocess.Popen,
    what: str,
    log_path: Path | None = None,
    timeout_s: float = 30.0,
) -> None:
    """Poll ``GET path`` until it returns 2xx; raise if the process exits first."""
    deadline = time.monotonic() + timeout_s
    last_error = "no response"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(
                f"{what} exited with code {process.returncode} during start-up"
                + _log_tail(log_path)
            )
        try:
            status, _ = http_get(port, path, timeout_s=2)
            if 200 <= status < 300:
                return
            last_error = f"HTTP {status}"
        except OSError as exc:
            last_error = str(exc)
        time.sleep(0.1)
    raise BenchError(
        f"{what} did not respond to GET {path} on port {port} within {timeout_s:g} s "
        f"({last_error})" + _log_tail(log_path)
    )


def _log_tail(path: Path | None) -> str:
    if path is None or not path.exists():
        return ""
    lines = path.read_text(errors="replace").splitlines()[-15:]
    return f"; last lines of {path}:\n" + "\n".join(lines)


def http_get(
    port: int,
    path: str,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 5.0,
) -> tuple[int, bytes]:
    """Send one GET to ``127.0.0.1:port``; returns the status and the body."""
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout_s)
    try:
        connection.request("GET", path, headers=dict(headers or {}))
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _nginx_config(workdir: Path, name: str, http_lines: list[str]) -> Path:
    """Write an nginx config with one worker, no access log and its own paths."""
    temp = workdir / "tmp" / name
    temp.mkdir(parents=True, exist_ok=True)
    temp.chmod(0o777)
    lines = [
        "daemon off;",
        "master_process on;",
        "worker_processes 1;",
        f"pid {workdir / (name + '.pid')};",
        f"error_log {workdir / (name + '-error.log')} warn;",
        "worker_rlimit_nofile 16384;",
        "events { worker_connections 8192; }",
    ]
    if os.geteuid() == 0:
        # As root, nginx runs its worker as this user, which must read the files.
        lines.append("user nobody nogroup;")
    lines += [
        "http {",
        "    access_log off;",
        f"    client_body_temp_path {temp / 'body'};",
        f"    proxy_temp_path {temp / 'proxy'};",
        f"    fastcgi_temp_path {temp / 'fastcgi'};",
        f"    uwsgi_temp_path {temp / 'uwsgi'};",
        f"    scgi_temp_path {temp / 'scgi'};",
        "    tcp_nodelay on;",
        f"    keepalive_requests {_KEEPALIVE_REQUESTS};",
        "    keepalive_timeout 120s;",
        *(f"    {line}" for line in http_lines),
        "}",
    ]
    path = workdir / f"{name}.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


def upstream_config(workdir: Path, root: Path, port: int) -> Path:
    """Write the static ScaiGrid stand-in's nginx config.

    The gateway always sends ``limit=``, so ``map $arg_limit`` picks the events
    page file: ``limit=1``, ``50`` or ``500``; any other value is a 404.
    """
    return _nginx_config(
        workdir,
        "upstream",
        [
            "sendfile on;",
            "etag off;",
            "open_file_cache max=64 inactive=600s;",
            "map $arg_limit $events_file {",
            "    1 /events-1.json;",
            "    50 /events-50.json;",
            "    500 /events-500.json;",
            "    default /no-such-page.json;",
            "}",
            "server {",
            f"    listen {HOST}:{port} backlog=4096;",
            f"    root {root};",
            "    default_type application/json;",
            "    location = /v1/modules/scaicore/events {",
            "        try_files $events_file =404;",
            "    }",
            "    location = /v1/models { try_files /models.json =404; }",
            "    location = /jwks.json { try_files /jwks.json =404; }",
            '    location = /healthz { return 200 \'{"status":"ok"}\'; }',
            '    location / { return 404 \'{"status":"error"}\'; }',
            "}",
        ],
    )


def proxy_config(workdir: Path, port: int, upstream_port: int) -> Path:
    """Write the reference reverse proxy's config: nginx doing the gateway's job.

    It serves the gateway's paths, keeps connections to the upstream alive,
    replaces ``Authorization`` with the tenant key as scaiproxy does in
    ``api_key`` mode, and sends and returns an ``X-Request-ID``.
    """

    def location(path: str, upstream_path: str) -> list[str]:
        return [
            f"    location = {path} {{",
            f"        proxy_pass http://scaigrid{upstream_path};",
            "        proxy_http_version 1.1;",
            '        proxy_set_header Connection "";',
            f'        proxy_set_header Authorization "Bearer {API_KEY}";',
            "        proxy_set_header X-Request-ID $request_id;",
            "        add_header X-Request-ID $request_id always;",
            "    }",
        ]

    return _nginx_config(
        workdir,
        "proxy",
        [
            # Large enough to hold the 500-event page in memory, not a temp file.
            "proxy_buffer_size 16k;",
            "proxy_buffers 64 16k;",
            "proxy_busy_buffers_size 64k;",
            "upstream scaigrid {",
            f"    server {HOST}:{upstream_port};",
            "    keepalive 256;",
            f"    keepalive_requests {_KEEPALIVE_REQUESTS};",
            "    keepalive_timeout 120s;",
            "}",
            "server {",
            f"    listen {HOST}:{port} backlog=4096;",
            *location("/api/v1/scaicore/events", "/v1/modules/scaicore/events"),
            *location("/api/v1/scaigrid/models", "/v1/models"),
            '    location = /healthz { return 200 \'{"status":"ok"}\'; }',
            "    location / { return 404; }",
            "}",
        ],
    )


def start_nginx(
    processes: Processes, nginx: str, workdir: Path, config: Path, port: int, name: str
) -> subprocess.Popen:
    """Check ``config`` with ``nginx -t``, start nginx and wait until it responds."""
    error_log = workdir / f"{name}-error.log"
    argv = [nginx, "-p", str(workdir), "-e", str(error_log), "-c", str(config)]
    check = subprocess.run(
        [*argv, "-t", "-q"], capture_output=True, text=True, timeout=30, check=False
    )
    if check.returncode != 0:
        raise BenchError(f"nginx rejected {config}: {check.stderr.strip()}")
    process = processes.start(argv)
    wait_http(port, "/healthz", process, f"nginx ({name})", error_log)
    return process


@dataclass(frozen=True)
class GatewayVariant:
    """One way of running scaiproxy in the benchmark."""

    name: str
    workers: int = 1
    log_level: str = "warning"
    #: The shipped default; one variant turns it off.
    coalesce_gets: bool = True


def gateway_config(
    workdir: Path,
    variant: GatewayVariant,
    port: int,
    upstream_port: int,
    plugins: Sequence[str],
) -> Path:
    """Write the gateway's YAML config for ``variant``."""
    base_url = f"http://{HOST}:{upstream_port}"
    blocks: dict[str, Any] = {"enabled": list(plugins)}
    if "lookups" in plugins:
        # Each models request reaches the upstream, as it does through nginx.
        blocks["lookups"] = {"cache_ttl_s": 0}
    config = {
        "environment": "development",
        "server": {"host": HOST, "port": port, "base_path": "/api"},
        "upstream": {"base_url": base_url, "coalesce_gets": variant.coalesce_gets},
        "auth": {
            "mode": "scaikey",
            "jwks_url": f"{base_url}/jwks.json",
            "issuers": [ISSUER],
            "audience": AUDIENCE,
            "upstream_credentials": "api_key",
        },
        "secrets": {"backend": "none"},
        "logging": {"level": variant.log_level, "format": "json"},
        "plugins": blocks,
    }
    path = workdir / f"gateway-{variant.name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def gateway_environment() -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        # These would override the generated config.
        if key not in ("SCAIFLOW_DEPLOY_AUTH", "SCAIPROXY_CONFIG")
    }
    env["SCAIGRID_API_KEY"] = API_KEY
    return env


def parent_of(pid: int) -> int | None:
    """Return the parent pid of ``pid``, ``None`` once it has gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    return None


def children(pid: int, cmdline_contains: bytes = b"") -> list[int]:
    """Return the pids of ``pid``'s children whose command line contains a string."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or parent_of(int(entry.name)) != pid:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if cmdline_contains in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def spawn_children(pid: int) -> list[int]:
    """Return the pids of ``pid``'s multiprocessing worker children."""
    return children(pid, b"spawn_main")


def start_gateway(
    processes: Processes,
    scaiproxy: Sequence[str],
    workdir: Path,
    config: Path,
    variant: GatewayVariant,
    port: int,
) -> tuple[subprocess.Popen, list[int]]:
    """Start ``scaiproxy serve``; returns the process and its worker pids."""
    log_path = workdir / f"gateway-{variant.name}.log"
    log_file = log_path.open("wb")
    argv = [*scaiproxy, "serve", "--config", str(config), "--port", str(port)]
    if variant.workers > 1:
        argv += ["--workers", str(variant.workers)]
    process = processes.start(argv, env=gateway_environment(), stderr=log_file)
    log_file.close()
    wait_http(port, "/readyz", process, f"scaiproxy ({variant.name})", log_path)
    if variant.workers == 1:
        return process, [process.pid]

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        workers = spawn_children(process.pid)
        if len(workers) == variant.workers:
            # Every worker must have bound the port before the load starts.
            time.sleep(2.0)
            return process, workers
        time.sleep(0.2)
    raise BenchError(
        f"scaiproxy ({variant.name}) started {len(spawn_children(process.pid))} "
        f"of {variant.workers} workers within 30 s" + _log_tail(log_path)
    )


def memory_kb(pid: int, field_name: str) -> int | None:
    """Read a ``Vm*`` field of ``/proc/PID/status`` in KiB (VmRSS, VmHWM)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def meminfo_kb(field_name: str) -> int | None:
    """Read a field of ``/proc/meminfo`` in KiB, such as MemTotal."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return None


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: Sequence[int]) -> float:
    """Sum the user and system CPU time of ``pids`` from ``/proc/PID/stat``."""
    total = 0.0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        # The command name in brackets may contain spaces; fields follow it.
        fields = stat.rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    return total
