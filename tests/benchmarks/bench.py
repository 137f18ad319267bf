"""Benchmark scaiproxy against nginx on one machine and print one Markdown table.

A static nginx replaces ScaiGrid. Each workload is measured with wrk
against every target in turn, over several rounds: the upstream directly, nginx
as a plain reverse proxy, a bare aiohttp proxy, an aiohttp server that responds
from memory, scaiproxy with one worker and with two, and on the 50-event page
scaiproxy with the access log on and with request coalescing off. The run
also reads the gateway's memory (after start-up, peak, and with 1,000 idle
keep-alive connections) and, with ``--profile``, samples the one-worker gateway
with py-spy.

    .venv/bin/python tests/benchmarks/bench.py [--duration 3] [--rounds 3] [--quick]

docs/benchmarks.md describes the method and holds the recorded results.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import re
import resource
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import profiling
import servers
import wrk
from fixtures import PAGE_SIZES, Credentials, make_credentials, write_upstream_files
from servers import HOST, BenchError, GatewayVariant, Processes

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS_PAGE = REPO_ROOT / "docs" / "benchmarks.md"
RESULTS_START = "<!-- bench:results:start -->"
RESULTS_END = "<!-- bench:results:end -->"

IDLE_CONNECTIONS = 1000
MODELS_IN_LIST = 8


@dataclass(frozen=True)
class Workload:
    """One request, as sent to the gateway and nginx, and as sent upstream."""

    name: str
    path: str
    upstream_path: str
    #: Items the response must contain: events in the page, or models in the list.
    items: int


def workloads(with_models: bool) -> list[Workload]:
    result = [
        Workload(
            f"events-{size}",
            f"/api/v1/scaicore/events?limit={size}",
            f"/v1/modules/scaicore/events?limit={size}",
            size,
        )
        for size in PAGE_SIZES
    ]
    if with_models:
        result.append(
            Workload("models", "/api/v1/scaigrid/models", "/v1/models", MODELS_IN_LIST)
        )
    return result


@dataclass
class Target:
    """A server under load; ``direct`` targets are sent the upstream paths."""

    key: str
    label: str
    port: int
    pids: list[int]
    direct: bool = False
    #: Workload names this target runs; empty for all of them.
    only: tuple[str, ...] = ()
    #: VmRSS of each pid right after start-up, in KiB.
    startup_rss_kb: list[int | None] = field(default_factory=list)

    def path(self, workload: Workload) -> str:
        return workload.upstream_path if self.direct else workload.path

    def runs(self, workload: Workload) -> bool:
        return not self.only or workload.name in self.only


@dataclass
class Run:
    """Everything one benchmark run measured."""

    targets: list[Target]
    workloads: list[Workload]
    concurrency: tuple[int, ...]
    rounds: int
    results: dict[tuple[str, int, str], list[wrk.WrkResult]] = field(
        default_factory=dict
    )
    memory: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    profile: str | None = None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark scaiproxy against nginx and print one Markdown table."
    )
    parser.add_argument(
        "--duration", type=int, help="seconds per wrk run (default 3; 1 with --quick)"
    )
    parser.add_argument(
        "--rounds", type=int, help="rounds per measurement (default 3; 1 with --quick)"
    )
    parser.add_argument(
        "--concurrency",
        help="comma-separated connection counts (default 1,16,64,256; 16,64 with "
        "--quick)",
    )
    parser.add_argument(
        "--workloads",
        default="",
        help="comma-separated workloads (events-1, events-50, events-500, models); "
        "default all",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short run: 1 round of 1 s at 16 and 64 connections, unless those "
        "options are given",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also sample the one-worker gateway with py-spy (installs it if needed)",
    )

    parser.add_argument(
        "--profile-seconds", type=int, default=10, help="py-spy sampling time"
    )
    parser.add_argument(
        "--output", type=Path, help="also write the Markdown results to this file"
    )
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help=f"replace the results section of {DOCS_PAGE.relative_to(REPO_ROOT)}",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work folder with configs and logs"
    )
    parser.add_argument(
        "--in-place",
        action="store_true",
        help="run the gateway from this environment instead of a new virtualenv "
        "with the runtime dependencies only",
    )
    args = parser.parse_args(argv)

    defaults = (1, 1, "16,64") if args.quick else (3, 3, "1,16,64,256")
    if args.duration is None:
        args.duration = defaults[0]
    if args.rounds is None:
        args.rounds = defaults[1]
    if args.concurrency is None:
        args.concurrency = defaults[2]

    try:
        args.concurrency = tuple(int(n) for n in args.concurrency.split(",") if n)
    except ValueError:
        parser.error(
            f"--concurrency: expected integers such as 1,16, got {args.concurrency!r}"
        )
    if not args.concurrency or min(args.concurrency) < 1:
        parser.error("--concurrency: give one or more counts of 1 or more")
    if args.duration < 1 or args.rounds < 1 or args.profile_seconds < 1:
        parser.error("--duration, --rounds and --profile-seconds must be 1 or more")
    return args


def find_tool(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(path) for path in (Path("/usr/sbin") / name,) if path.exists()), None
    )


def ensure_tools() -> tuple[str, str]:
    """Return the nginx and wrk executables, installing Debian's packages if missing."""
    nginx, load = find_tool("nginx"), find_tool("wrk")
    if nginx and load:
        return nginx, load
    if os.geteuid() != 0:
        raise BenchError(
            "nginx or wrk is missing; install them with "
            "'sudo apt-get install -y nginx-light wrk'"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "nginx-light", "wrk"]
    print("installing nginx-light and wrk with apt-get", file=sys.stderr)
    if subprocess.run(install, env=env, timeout=600, check=False).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, timeout=600, check=False)
        if subprocess.run(install, env=env, timeout=600, check=False).returncode != 0:
            raise BenchError(
                "apt-get install -y nginx-light wrk failed; see its output"
            )
    nginx, load = find_tool("nginx"), find_tool("wrk")
    if not (nginx and load):
        raise BenchError("nginx or wrk is still missing after apt-get install")
    return nginx, load


def raise_file_limit() -> None:
    """Allow enough open files for 1,000 idle connections, in every child too."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 16384 if hard == resource.RLIM_INFINITY else min(hard, 16384)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def gateway_command(workdir: Path | None = None) -> list[str]:
    """Return the command that runs scaiproxy.

    With ``workdir``, first install the repository and its runtime dependencies
    alone into a new virtualenv there, as a deployment would: the test extras
    (pytest, schemathesis, rich...) would add megabytes to the gateway's RSS.
    """
    if workdir is None:
        script = Path(sys.executable).parent / "scaiproxy"
        return (
            [str(script)]
            if script.exists()
            else [sys.executable, "-m", "scaiproxy.cli"]
        )
    venv = workdir / "gateway-venv"
    print("installing scaiproxy into a virtualenv of its own", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    install = [str(venv / "bin" / "pip"), "install", "-q", str(REPO_ROOT)]
    if subprocess.run(install, timeout=900, check=False).returncode != 0:
        raise BenchError(
            f"{' '.join(install)} failed; see its output, or run with --in-place"
        )
    return [str(venv / "bin" / "scaiproxy")]


def installed_plugins() -> set[str]:
    return {entry.name for entry in importlib.metadata.entry_points(group="scaiproxy")}


def auth_headers(credentials: Credentials) -> dict[str, str]:
    return {"Authorization": f"Bearer {credentials.token}"}


def check_response(target: Target, workload: Workload, headers: dict[str, str]) -> None:
    """Send one request and check that the response is the full, correct page."""
    status, body = servers.http_get(target.port, target.path(workload), headers)
    what = f"{target.label} on {workload.name}"
    if status != 200:
        raise BenchError(f"{what} responded with HTTP {status}: {body[:300]!r}")
    document = json.loads(body)
    data = document["data"]
    items = data if workload.name == "models" else data["events"]
    if len(items) != workload.items:
        raise BenchError(
            f"{what} returned {len(items)} items, expected {workload.items}"
        )


def start_baseline(
    processes: Processes, workdir: Path, upstream_port: int, cached: bool = False
) -> Target:
    """Start the bare aiohttp proxy, run on the small and the medium page only."""
    port = servers.free_port()
    name = "aiohttp-cached" if cached else "aiohttp"
    log_path = workdir / f"{name}.log"
    argv = [
        sys.executable,
        str(Path(__file__).with_name("aiohttp_baseline.py")),
        "--port",
        str(port),
        "--upstream",
        f"http://{HOST}:{upstream_port}",
    ]
    if cached:
        argv.append("--cached")
    with log_path.open("wb") as log_file:
        process = processes.start(argv, stderr=log_file)
    servers.wait_http(port, "/healthz", process, f"the {name} server", log_path)
    label = "aiohttp, stored answer" if cached else "bare aiohttp proxy"
    return Target(name, label, port, [process.pid], only=("events-1", "events-50"))


def start_targets(
    processes: Processes,
    workdir: Path,
    nginx: str,
    credentials: Credentials,
    plugins: list[str],
    workload_names: set[str],
    scaiproxy: list[str],
) -> tuple[list[Target], dict[str, int]]:
    """Start the upstream, nginx and the gateways; returns targets and file sizes."""
    upstream_port, proxy_port = servers.free_port(), servers.free_port()
    root = workdir / "upstream"
    sizes = write_upstream_files(root, credentials)
    config = servers.upstream_config(workdir, root, upstream_port)
    upstream = servers.start_nginx(
        processes, nginx, workdir, config, upstream_port, "upstream"
    )
    config = servers.proxy_config(workdir, proxy_port, upstream_port)
    proxy = servers.start_nginx(processes, nginx, workdir, config, proxy_port, "proxy")

    targets = [
        Target(
            "direct",
            "direct (upstream)",
            upstream_port,
            servers.children(upstream.pid),
            direct=True,
        ),
        Target("nginx", "nginx proxy", proxy_port, servers.children(proxy.pid)),
        start_baseline(processes, workdir, upstream_port),
        start_baseline(processes, workdir, upstream_port, cached=True),
    ]
    variants = [
        (GatewayVariant("1w"), "scaiproxy 1 worker", ()),
        (GatewayVariant("2w", workers=2), "scaiproxy 2 workers", ()),
    ]
    if "events-50" in workload_names:
        variants += [
            (
                GatewayVariant("1w-info", log_level="info"),
                "scaiproxy 1 worker, log info",
                ("events-50",),
            ),
            (
                GatewayVariant("1w-direct", coalesce_gets=False),
                "scaiproxy 1 worker, no coalescing",
                ("events-50",),
            ),
        ]
    for variant, label, only in variants:
        targets.append(
            start_gateway_target(
                processes,
                workdir,
                variant,
                label,
                upstream_port,
                plugins,
                scaiproxy,
                only,
            )
        )
    return targets, sizes


def start_gateway_target(
    processes: Processes,
    workdir: Path,
    variant: GatewayVariant,
    label: str,
    upstream_port: int,
    plugins: list[str],
    scaiproxy: list[str],
    only: tuple[str, ...] = (),
) -> Target:
    """Start one scaiproxy variant and note each worker's RSS after start-up."""
    port = servers.free_port()
    config = servers.gateway_config(workdir, variant, port, upstream_port, plugins)
    _, pids = servers.start_gateway(
        processes, scaiproxy, workdir, config, variant, port
    )
    target = Target(variant.name, label, port, pids, only=only)
    target.startup_rss_kb = [servers.memory_kb(pid, "VmRSS") for pid in pids]
    return target


def measure(
    run: Run,
    processes: Processes,
    load: str,
    headers: dict[str, str],
    duration_s: int,
) -> None:
    """Run wrk over workloads and concurrencies, every target in turn each round."""
    steps = sum(
        run.rounds * len(run.concurrency) * sum(t.runs(w) for t in run.targets)
        for w in run.workloads
    )
    done = 0
    started = time.monotonic()
    for workload in run.workloads:
        for target in run.targets:
            if target.runs(workload):
                # A warm-up: JWKS fetch, upstream pool, first-call caches.
                wrk.run(
                    processes,
                    load,
                    f"http://{HOST}:{target.port}{target.path(workload)}",
                    concurrency=16,
                    duration_s=1,
                    headers=headers,
                )
        for concurrency in run.concurrency:
            for round_number in range(1, run.rounds + 1):
                for target in run.targets:
                    if not target.runs(workload):
                        continue
                    cpu_before = servers.cpu_seconds(target.pids)
                    result = wrk.run(
                        processes,
                        load,
                        f"http://{HOST}:{target.port}{target.path(workload)}",
                        concurrency=concurrency,
                        duration_s=duration_s,
                        headers=headers,
                    )
                    cpu = servers.cpu_seconds(target.pids) - cpu_before
                    if result.requests:
                        result = dataclasses.replace(
                            result, cpu_us_per_request=cpu * 1e6 / result.requests
                        )
                    key = (workload.name, concurrency, target.key)
                    run.results.setdefault(key, []).append(result)
                    done += 1
                    print(
                        f"[{done}/{steps} {time.monotonic() - started:5.0f} s] "
                        f"{workload.name} c{concurrency} round {round_number} "
                        f"{target.label}: {result.requests_per_s:.0f} req/s, "
                        f"p99 {result.p99_ms:.2f} ms, {result.errors} errors",
                        file=sys.stderr,
                    )


def median_round(results: list[wrk.WrkResult]) -> wrk.WrkResult:
    """Return the round with the median requests per second (the lower of two)."""
    ordered = sorted(results, key=lambda result: result.requests_per_s)
    return ordered[(len(ordered) - 1) // 2]


def mebibytes(kib: int | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.1f} MiB"


def read_peak_memory(run: Run) -> None:
    """Record the RSS after start-up and the peak (VmHWM) of every gateway process."""

    def add(what: str, kib: int | None) -> None:
        run.memory.append((what, mebibytes(kib)))

    for target in run.targets:
        if target.key == "nginx":
            for pid in target.pids:
                add("nginx proxy worker, peak (VmHWM)", servers.memory_kb(pid, "VmHWM"))
        if target.key not in ("1w", "2w"):
            continue
        if target.key == "2w":
            master = servers.parent_of(target.pids[0])
            if master is not None:
                add(
                    f"{target.label}: master process, peak (VmHWM)",
                    servers.memory_kb(master, "VmHWM"),
                )
        for index, pid in enumerate(target.pids):
            name = f"worker {index + 1}" if len(target.pids) > 1 else "worker"
            startup = target.startup_rss_kb[index] if target.startup_rss_kb else None
            add(f"{target.label}: {name} after start-up (VmRSS)", startup)
            add(
                f"{target.label}: {name}, peak (VmHWM)", servers.memory_kb(pid, "VmHWM")
            )


def idle_connections(
    run: Run,
    processes: Processes,
    target: Target,
    headers: dict[str, str],
    before_label: str = "after the load runs",
) -> None:
    """Read the RSS of ``target`` while a separate process keeps idle connections open.

    Each connection first requests the 1-event page, then stays open.
    """
    path = "/api/v1/scaicore/events?limit=1"
    pid = target.pids[0]
    before = servers.memory_kb(pid, "VmRSS")
    argv = [
        sys.executable,
        str(Path(__file__).with_name("idle_clients.py")),
        "--port",
        str(target.port),
        "--path",
        path,
        "--count",
        str(IDLE_CONNECTIONS),
        "--hold-s",
        "60",
    ]
    for name, value in headers.items():
        argv += ["--header", f"{name}: {value}"]
    client = processes.start(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        line = _read_line(client, timeout_s=60)
        match = re.fullmatch(r"ready (\d+) (\d+)", line.strip())
        if match is None:
            raise BenchError(
                f"the idle-connection client printed {line!r}, not 'ready'"
            )
        opened, failed = int(match.group(1)), int(match.group(2))
        time.sleep(1.0)
        during = servers.memory_kb(pid, "VmRSS")
    finally:
        if client.stdin is not None:
            client.stdin.close()
        processes.stop(client, timeout_s=15)
    label = f"{target.label}: with {opened} idle keep-alive connections (VmRSS)"
    if failed:
        label += f", {failed} failed to open"
    run.memory.append((f"{target.label}: {before_label} (VmRSS)", mebibytes(before)))
    run.memory.append((label, mebibytes(during)))


def _read_line(process: subprocess.Popen, timeout_s: float) -> str:
    """Read one line of the process's stdout within ``timeout_s``."""
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    if not selector.select(timeout_s):
        raise BenchError(
            f"the idle-connection client was not ready within {timeout_s:g} s"
        )
    return process.stdout.readline().decode(errors="replace")


def coalescing_note(run: Run) -> None:
    """Say how many upstream calls the one-worker gateway made per request."""
    target = next((t for t in run.targets if t.key == "1w"), None)
    if target is None:
        return
    status, body = servers.http_get(target.port, "/metrics")
    if status != 200:
        return
    text = body.decode()

    def total(metric: str) -> float:
        pattern = re.compile(
            rf'^{metric}\{{[^}}]*route="scaicore.events"[^}}]*\}} (\S+)$', re.MULTILINE
        )
        return sum(float(value) for value in pattern.findall(text))

    requests = total("scaiproxy_requests_total")
    calls = total("scaiproxy_upstream_requests_total")
    if requests:
        run.notes.append(
            f"With coalescing on (the shipped default), the one-worker gateway made "
            f"{100 * calls / requests:.0f} upstream calls per 100 events requests "
            "over all its runs (every page size and connection count): identical "
            "GETs in flight shared one upstream call."
        )


def run_profile(
    run: Run,
    processes: Processes,
    load: str,
    target: Target,
    workload: Workload,
    headers: dict[str, str],
    seconds: int,
    workdir: Path,
) -> None:
    """Sample the one-worker gateway while wrk loads it at 16 connections."""
    output = workdir / "py-spy.txt"
    url = f"http://{HOST}:{target.port}{target.path(workload)}"
    argv = [load, "-t1", "-c16", f"-d{seconds + 3}s", "--latency"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    load_process = processes.start([*argv, url], stdout=subprocess.PIPE)
    try:
        time.sleep(1.0)
        sampler = profiling.record(processes, target.pids[0], seconds, output)
        sampler_output, _ = sampler.communicate(timeout=seconds + 60)
        processes.stop(sampler)
        load_output, _ = load_process.communicate(timeout=seconds + 30)
    finally:
        processes.stop(load_process)
    if not output.exists():
        raise BenchError(f"py-spy wrote no profile: {sampler_output.decode()[-500:]}")
    during = wrk.parse(load_output.decode())
    run.profile = (
        f"py-spy {profiling.version()}, {seconds} s at 250 samples/s on the one-worker "
        f"gateway, {workload.name} at 16 connections "
        f"({during.requests_per_s:.0f} req/s while sampled).\n\n"
        + profiling.markdown(profiling.summarise(output))
    )


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory = servers.meminfo_kb("MemTotal")
    usable = len(os.sched_getaffinity(0))
    return (
        f"{cpu}, {os.cpu_count()} logical cores ({usable} usable by this process), "
        f"{mebibytes(memory)} RAM, Linux {platform.release()}"
    )


def python_build() -> str:
    """Say whether this Python was built with profile-guided optimisation."""
    flags = sysconfig.get_config_var("CONFIG_ARGS") or ""
    if "--enable-optimizations" in flags:
        return "built with --enable-optimizations"
    return "built without --enable-optimizations"


def cpu_times() -> list[int]:
    """Return the machine's CPU time counters: the ``cpu`` line of /proc/stat."""
    line = Path("/proc/stat").read_text().splitlines()[0]
    return [int(value) for value in line.split()[1:9]]


def own_cpu_seconds(processes: Processes) -> float:
    """CPU time of this script and every process it started, ended or running."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    for process in processes.started:
        if process.poll() is None:
            pids = [process.pid, *servers.children(process.pid)]
            total += servers.cpu_seconds(pids)
    return total


def warn_if_busy(processes: Processes, seconds: float = 2.0) -> None:
    """Warn when other processes already keep the CPUs busy before the run."""
    before, own = cpu_times(), own_cpu_seconds(processes)
    time.sleep(seconds)
    shares = machine_shares(before, cpu_times(), own_cpu_seconds(processes) - own)
    if shares.others > 0.1:
        print(
            f"bench: other processes use {100 * shares.others:.0f} % of the CPU "
            "time; the figures will be lower and noisier than on a quiet machine",
            file=sys.stderr,
        )


@dataclass(frozen=True)
class MachineShares:
    """Shares of the machine's CPU time during the run that were not the run's."""

    steal: float
    others: float


def machine_shares(
    before: list[int], after: list[int], own_seconds: float
) -> MachineShares:
    """Compare /proc/stat counters with the run's own CPU time.

    The counters are user, nice, system, idle, iowait, irq, softirq and steal,
    in clock ticks summed over all cores.
    """
    deltas = [end - start for start, end in zip(before, after)]
    total = sum(deltas)
    if not total:
        return MachineShares(0.0, 0.0)
    ticks = os.sysconf("SC_CLK_TCK")
    busy = total - deltas[3] - deltas[4] - deltas[7]
    others = max(0.0, busy / ticks - own_seconds) / (total / ticks)
    return MachineShares(deltas[7] / total, others)


def versions(nginx: str, load: str) -> str:
    nginx_version = (
        subprocess.run(
            [nginx, "-v"], capture_output=True, text=True, timeout=10, check=False
        )
        .stderr.strip()
        .rsplit("/", 1)[-1]
    )
    wrk_banner = subprocess.run(
        [load, "-v"], capture_output=True, text=True, timeout=10, check=False
    ).stdout.split()
    wrk_version = wrk_banner[1] if len(wrk_banner) > 1 else "unknown"
    return (
        f"Python {platform.python_version()} ({python_build()}), "
        f"aiohttp {importlib.metadata.version('aiohttp')}, "
        f"nginx {nginx_version}, wrk {wrk_version}, "
        f"scaiproxy {importlib.metadata.version('scaiproxy')}"
    )


def command_line(argv: Sequence[str]) -> str:
    python = Path(sys.executable)
    script = Path(__file__).resolve()
    try:
        python = python.relative_to(Path.cwd())
        script = script.relative_to(Path.cwd())
    except ValueError:
        pass
    return shlex.join([str(python), str(script), *argv])


def results_table(run: Run) -> str:
    """Render the main table: one row per workload, concurrency and target."""
    lines = [
        (
            "| workload | connections | target | req/s | p50 ms | p99 ms "
            "| × nginx req/s | p99 added over direct, ms | CPU µs/req | errors |"
        ),
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for workload in run.workloads:
        for concurrency in run.concurrency:
            medians = {
                target.key: median_round(
                    run.results[(workload.name, concurrency, target.key)]
                )
                for target in run.targets
                if (workload.name, concurrency, target.key) in run.results
            }
            nginx = medians.get("nginx")
            direct = medians.get("direct")
            for target in run.targets:
                result = medians.get(target.key)
                if result is None:
                    continue
                rounds = run.results[(workload.name, concurrency, target.key)]
                errors = sum(r.errors for r in rounds)
                requests = sum(r.requests for r in rounds)
                ratio = (
                    f"{result.requests_per_s / nginx.requests_per_s:.2f}"
                    if nginx
                    else ""
                )
                added = (
                    f"{result.p99_ms - direct.p99_ms:+.2f}"
                    if direct and target.key != "direct"
                    else ""
                )
                error_text = f"**{errors} of {requests}**" if errors else "0"
                cpu = result.cpu_us_per_request
                cpu_text = f"{cpu:.0f}" if cpu is not None else ""
                lines.append(
                    f"| {workload.name} | {concurrency} | {target.label} "
                    f"| {result.requests_per_s:,.0f} | {result.p50_ms:.2f} "
                    f"| {result.p99_ms:.2f} | {ratio} | {added} | {cpu_text} "
                    f"| {error_text} |"
                )
    return "\n".join(lines) + "\n"


def report_header(
    args: argparse.Namespace,
    started: float,
    nginx: str,
    load: str,
    sizes: dict[str, int],
    shares: MachineShares,
) -> str:
    """Describe the run: when, how, on what machine, with which versions."""
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
    minutes = (time.time() - started) / 60
    bodies = ", ".join(
        f"{name.removesuffix('.json')} {size / 1024:.1f} KiB"
        for name, size in sizes.items()
        if name != "jwks.json"
    )
    rounds = f"{args.rounds} round{'s' if args.rounds > 1 else ''}"
    median = (
        f"Each row is the median of {rounds} of {args.duration} s: the round with "
        "the median requests per second. Errors are summed over all rounds."
    )
    contention = (
        f"Machine CPU time during the run: {100 * shares.steal:.1f} % stolen by "
        f"the hypervisor, {100 * shares.others:.1f} % used by processes the run "
        "did not start."
    )
    lines = [
        f"Run on {date}, {minutes:.1f} min, with `{command_line(sys.argv[1:])}`.",
        "",
        f"- Machine: {machine()}.",
        f"- {contention}",
        f"- Versions: {versions(nginx, load)}.",
        f"- {median}",
        f"- Upstream bodies: {bodies}.",
    ]
    return "\n".join(lines)


def report(run: Run, header: str) -> str:
    parts = [header, "", results_table(run)]
    if run.notes:
        parts += ["", *[f"- {note}" for note in run.notes], ""]
    if run.memory:
        parts += [
            "",
            "| memory | RSS |",
            "|---|---:|",
            *[f"| {what} | {value} |" for what, value in run.memory],
            "",
        ]
    if run.profile:
        parts += ["", "#### Profile", "", run.profile]
    return "\n".join(parts).rstrip() + "\n"


def update_docs(markdown: str) -> None:
    text = DOCS_PAGE.read_text(encoding="utf-8")
    if RESULTS_START not in text or RESULTS_END not in text:
        raise BenchError(
            f"{DOCS_PAGE} has no {RESULTS_START} ... {RESULTS_END} section to replace"
        )
    head, rest = text.split(RESULTS_START, 1)
    _, tail = rest.split(RESULTS_END, 1)
    DOCS_PAGE.write_text(
        f"{head}{RESULTS_START}\n{markdown}{RESULTS_END}{tail}", encoding="utf-8"
    )


def benchmark(args: argparse.Namespace, workdir: Path, processes: Processes) -> str:
    nginx, load = ensure_tools()
    if args.profile:
        profiling.ensure_py_spy()
    raise_file_limit()
    warn_if_busy(processes)
    started = time.time()
    cpu_at_start = cpu_times()
    own_at_start = own_cpu_seconds(processes)

    plugins = ["scaicore"]
    notes = []
    if "lookups" in installed_plugins():
        plugins.append("lookups")
    else:
        notes.append(
            "The lookups plugin is not installed, so the models workload was skipped."
        )
    chosen = workloads("lookups" in plugins)
    if args.workloads:
        names = set(args.workloads.split(","))
        unknown = names - {w.name for w in workloads(True)}
        if unknown:
            raise BenchError(
                f"unknown workloads {sorted(unknown)}; use events-1, events-50, "
                "events-500 or models"
            )
        chosen = [w for w in chosen if w.name in names]
    if not chosen:
        raise BenchError("no workload left to run; check --workloads")

    scaiproxy = gateway_command(None if args.in_place else workdir)
    credentials = make_credentials()
    # nginx's worker runs as nobody when started by root, and must read the files.
    workdir.chmod(0o755)
    targets, sizes = start_targets(
        processes,
        workdir,
        nginx,
        credentials,
        plugins,
        {w.name for w in chosen},
        scaiproxy,
    )
    headers = auth_headers(credentials)
    for workload in chosen:
        for target in targets:
            if target.runs(workload):
                check_response(target, workload, headers)

    run = Run(targets, chosen, args.concurrency, args.rounds, notes=notes)
    measure(run, processes, load, headers, args.duration)
    read_peak_memory(run)
    coalescing_note(run)

    one_worker = next(t for t in targets if t.key == "1w")
    nginx_target = next(t for t in targets if t.key == "nginx")
    idle_connections(run, processes, one_worker, headers)
    idle_connections(run, processes, nginx_target, headers)
    # A gateway that served no load before shows the cost of the connections alone.
    upstream_port = next(t for t in targets if t.key == "direct").port
    fresh = start_gateway_target(
        processes,
        workdir,
        GatewayVariant("1w-fresh"),
        "scaiproxy 1 worker, no load before",
        upstream_port,
        plugins,
        scaiproxy,
    )
    idle_connections(run, processes, fresh, headers, before_label="after start-up")

    if args.profile:
        page = next((w for w in chosen if w.name == "events-50"), chosen[0])
        run_profile(
            run,
            processes,
            load,
            one_worker,
            page,
            headers,
            args.profile_seconds,
            workdir,
        )

    shares = machine_shares(
        cpu_at_start, cpu_times(), own_cpu_seconds(processes) - own_at_start
    )
    header = report_header(args, started, nginx, load, sizes, shares)
    return report(run, header)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    processes = Processes()

    def interrupted(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    workdir = Path(tempfile.mkdtemp(prefix="scaiproxy-bench-"))
    try:
        markdown = benchmark(args, workdir, processes)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; stopping every process it started", file=sys.stderr)
        return 130
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        processes.stop_all()
        if args.keep:
            print(f"bench: configs and logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(markdown)
    if args.output:
        args.output.write_text(markdown, encoding="utf-8")
    if args.update_docs:
        update_docs(markdown)
        print(f"bench: wrote the results into {DOCS_PAGE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
