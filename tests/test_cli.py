"""The scaiproxy command as a user runs it: real processes, real ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCAIPROXY = [sys.executable, "-m", "scaiproxy.cli"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(*args: str, cwd: Path = ROOT, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SCAIPROXY, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_sim_help_lists_options():
    result = run("sim", "--help")
    assert result.returncode == 0
    assert "--port" in result.stdout
    assert "--latency-ms" in result.stdout


def test_check_config_shipped_file():
    result = run("check-config")
    assert result.returncode == 0
    assert "11 routes" in result.stdout


def test_check_config_counts_plugin_routes():
    routes = run("routes")
    listed = [line for line in routes.stdout.splitlines()[1:] if line.strip()]
    assert f"{len(listed)} routes" in run("check-config").stdout


def test_routes_needs_no_secret_backend_token(tmp_path):
    path = tmp_path / "vault.yaml"
    path.write_text(
        "upstream: {base_url: 'http://127.0.0.1:9'}\n"
        "auth: {mode: disabled}\n"
        "plugins: {enabled: [scaicore]}\n"
        "secrets:\n"
        "  backend: scaivault\n"
        "  scaivault: {base_url: 'http://127.0.0.1:9', token_env: NO_SUCH_TOKEN_VAR}\n"
    )
    listed = run("routes", "--config", str(path))
    assert listed.returncode == 0, listed.stderr
    assert "/api/v1/scaicore/events" in listed.stdout
    checked = run("check-config", "--config", str(path))
    assert checked.returncode == 2
    assert "NO_SUCH_TOKEN_VAR" in checked.stderr


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a: &a [*a]\n", "aliases (*name) are not supported"),
        ("environment: production\nenvironment: development\n", "duplicate key"),
        ("upstream: {base_url: 'http://x', timeout_s: abc}\n", "upstream.timeout_s"),
    ],
    ids=["alias-cycle", "duplicate-key", "bad-type"],
)
def test_check_config_rejects_without_traceback(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = run("check-config", "--config", str(path))
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_unresolvable_host_explains():
    result = run("serve", "--host", "not a host!!", "--port", str(free_port()))
    assert result.returncode != 0
    assert "the host name does not resolve" in result.stderr
    assert "server.host" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_busy_port_explains(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run("serve", "--port", str(port), timeout=30)
    assert result.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


async def test_demo_end_to_end(tmp_path):
    """The README's first command: the demo serves real requests, then stops."""
    gateway_port, sim_port = free_port(), free_port()
    log = (tmp_path / "demo.log").open("w")
    process = subprocess.Popen(
        [
            *SCAIPROXY,
            "demo",
            "--config",
            str(ROOT / "config.yaml"),
            "--port",
            str(gateway_port),
            "--sim-port",
            str(sim_port),
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        banner = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            banner.append(line)
            if "Press Ctrl-C to stop" in line or not line:
                break
        text = "".join(banner)
        assert "First request through the gateway" in text
        assert "HTTP 200" in text
        token = (tmp_path / "var" / "demo-token").read_text().strip()
        base = f"http://127.0.0.1:{gateway_port}/api"
        headers = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession(headers=headers) as session:
            async with session.get(f"{base}/v1/scaicore/events?limit=5") as response:
                assert response.status == 200
                events = (await response.json())["data"]["events"]
            async with session.get(f"{base}/v1/scaicore/checkpoints") as response:
                checkpoints = (await response.json())["data"]["checkpoints"]
            checkpoint = checkpoints[0]
            resolve = f"{base}/v1/scaicore/checkpoints/{checkpoint['id']}/resolve"
            decision = {"resolution": checkpoint["options"][0]}
            async with session.post(resolve, json=decision) as response:
                assert response.status == 200
        assert len(events) == 5
        assert events[0]["type"].startswith("scaicore.")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
        log.close()
    assert process.returncode == 0


# The console script that pip installs, as a user types it.
SCAIPROXY_SCRIPT = Path(sys.executable).with_name("scaiproxy")


def run_script(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SCAIPROXY_SCRIPT), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_sim_help_names_scaiproxy_sim():
    result = run_script("sim", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: scaiproxy sim ")


def test_sim_bad_option_names_scaiproxy_sim():
    result = run_script("sim", "--error-rate", "2")
    assert result.returncode == 2
    assert result.stderr.startswith("usage: scaiproxy sim ")
    assert "scaiproxy sim: error: " in result.stderr


def test_sim_busy_port_names_scaiproxy_sim():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_script("sim", "--port", str(port), timeout=30)
    assert result.returncode == 1
    assert f"scaiproxy sim: error: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_simulator_module_help_names_module():
    result = subprocess.run(
        [sys.executable, "-m", "scaiproxy.simulator", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m scaiproxy.simulator ")


@pytest.mark.parametrize(
    "args",
    [
        ("sim", "--port", "70000"),
        ("sim", "--port", "-5"),
        ("demo", "--sim-port", "70000"),
        ("demo", "--port", "eighty"),
    ],
)
def test_port_out_of_range_explained(args):
    result = run(*args)
    assert result.returncode == 2
    assert "expected a port from 0 to 65535" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("value", ["inf", "nan", "-1"])
def test_sim_latency_must_be_finite(value):
    result = run("sim", "--latency-ms", value)
    assert result.returncode == 2
    assert "latency_ms must be from 0 to" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_explains_unwritable_token_file(tmp_path):
    (tmp_path / "var").write_text("a file where the demo wants a folder\n")
    config = tmp_path / "config.yaml"
    config.write_text((ROOT / "config.yaml").read_text())
    result = run(
        "demo",
        "--config",
        str(config),
        "--port",
        str(free_port()),
        "--sim-port",
        str(free_port()),
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "cannot write the demo token to var/demo-token" in result.stderr
    assert "Traceback" not in result.stderr
