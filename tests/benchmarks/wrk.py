"""Running wrk and reading its report."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

from servers import BenchError, Processes

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}
_DURATION = r"([\d.]+)(us|ms|s|m)\b"
_REQUESTS_PER_S = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_PERCENTILE = r"^\s+{}%\s+" + _DURATION
_TOTAL = re.compile(r"^\s+(\d+) requests in " + _DURATION, re.MULTILINE)
_SOCKET_ERRORS = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


@dataclass(frozen=True)
class WrkResult:
    """One wrk run: throughput, latency percentiles in ms, and failures."""

    requests: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    #: Responses with a status of 400 or more (wrk counts those as errors).
    bad_status: int
    socket_errors: int
    #: CPU time (user and system) the target's processes spent per request, in µs.
    cpu_us_per_request: float | None = None

    @property
    def errors(self) -> int:
        return self.bad_status + self.socket_errors


def threads_for(concurrency: int) -> int:
    """Return the wrk threads used at ``concurrency`` connections."""
    return 1 if concurrency <= 16 else 2


def _milliseconds(value: str, unit: str) -> float:
    return float(value) * _UNITS_MS[unit]


def parse(output: str) -> WrkResult:
    """Read wrk's ``--latency`` report; raises :class:`BenchError` if incomplete."""
    rate = _REQUESTS_PER_S.search(output)
    p50 = re.search(_PERCENTILE.format("50"), output, re.MULTILINE)
    p99 = re.search(_PERCENTILE.format("99"), output, re.MULTILINE)
    total = _TOTAL.search(output)
    if not (rate and p50 and p99 and total):
        raise BenchError(f"wrk printed no complete --latency report:\n{output[-2000:]}")
    socket = _SOCKET_ERRORS.search(output)
    non_2xx = _NON_2XX.search(output)
    return WrkResult(
        requests=int(total.group(1)),
        requests_per_s=float(rate.group(1)),
        p50_ms=_milliseconds(p50.group(1), p50.group(2)),
        p99_ms=_milliseconds(p99.group(1), p99.group(2)),
        bad_status=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in socket.groups()) if socket else 0,
    )


def run(
    processes: Processes,
    wrk: str,
    url: str,
    *,
    concurrency: int,
    duration_s: float,
    headers: dict[str, str],
) -> WrkResult:
    """Run wrk against ``url`` for ``duration_s`` seconds and parse its report."""
    argv = [
        wrk,
        f"-t{threads_for(concurrency)}",
        f"-c{concurrency}",
        f"-d{duration_s:g}s",
        "--timeout",
        "10s",
        "--latency",
    ]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(url)
    process = processes.start(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = process.communicate(timeout=duration_s + 30)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish within {duration_s + 30:g} s on {url}")
    finally:
        processes.stop(process)
    text = output.decode(errors="replace")
    if process.returncode != 0:
        raise BenchError(f"wrk failed with code {process.returncode} on {url}: {text}")
    return parse(text)
