"""Sampling the gateway with py-spy and summarising where its busy time goes."""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from servers import BenchError, Processes

_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")
REPO_ROOT = Path(__file__).resolve().parents[2]
# Prefixes cut from file names, so that frames read as package/module.py.
_PATH_PREFIXES = (
    "site-packages/",
    f"{REPO_ROOT}/",
    sysconfig.get_paths()["stdlib"] + "/",
)


@dataclass(frozen=True)
class Profile:
    """py-spy's samples of threads that were not idle, counted per frame.

    py-spy samples wall time: a thread preempted inside a system call still
    counts, and one waiting in the event loop's ``epoll`` does not.
    """

    samples: int
    self_counts: Counter
    inclusive_counts: Counter
    package_counts: Counter


def py_spy_path() -> Path:
    return Path(sys.executable).parent / "py-spy"


def version() -> str:
    result = subprocess.run(
        [str(py_spy_path()), "--version"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return result.stdout.split()[-1] if result.stdout.split() else "unknown"


def ensure_py_spy() -> Path:
    """Install py-spy into the running virtualenv when it is missing."""
    path = py_spy_path()
    if path.exists():
        return path
    print("installing py-spy into the virtualenv", file=sys.stderr)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "py-spy"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode != 0 or not path.exists():
        raise BenchError(f"pip install py-spy failed: {result.stderr.strip()[-500:]}")
    return path


def record(
    processes: Processes, pid: int, duration_s: int, output: Path, rate: int = 250
) -> subprocess.Popen:
    """Start py-spy on ``pid``; it writes collapsed stacks to ``output`` when done."""
    argv = [
        str(ensure_py_spy()),
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(duration_s),
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--output",
        str(output),
    ]
    return processes.start(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def short_location(path: str) -> str:
    for prefix in _PATH_PREFIXES:
        if prefix in path:
            return path.split(prefix, 1)[1]
    return path


def package_of(location: str) -> str:
    head = location.split("/", 1)[0]
    head = head.removesuffix(".py")
    if location.startswith("plugins/"):
        return location.split("/")[1]
    return head or location


def _frame_key(frame: str) -> tuple[str, str]:
    match = _FRAME.match(frame)
    if match is None:
        return frame, ""
    return match.group("function"), short_location(match.group("file"))


def summarise(path: Path) -> Profile:
    """Count self and inclusive samples per function from py-spy's raw output."""
    self_counts: Counter = Counter()
    inclusive: Counter = Counter()
    packages: Counter = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_key(frame) for frame in stack.split(";")]
        # The first frame is the thread's name when py-spy adds one.
        frames = [frame for frame in frames if frame[1]]
        if not frames:
            continue
        total += count
        self_counts[frames[-1]] += count
        packages[package_of(frames[-1][1])] += count
        for frame in set(frames):
            inclusive[frame] += count
    return Profile(total, self_counts, inclusive, packages)


# Frames every sample passes through: the script, the CLI and the event loop.
_ENTRY_FILES = ("scaiproxy/cli.py", "asyncio/base_events.py", "asyncio/events.py")
_ENTRY_FUNCTIONS = ("<module>", "run_app")


def _is_entry_frame(frame: tuple[str, str]) -> bool:
    function, location = frame
    return location in _ENTRY_FILES or function in _ENTRY_FUNCTIONS


def markdown(profile: Profile, top: int = 15) -> str:
    """Render the top functions by self and by inclusive time, and a package rollup."""
    if not profile.samples:
        return "py-spy recorded no samples.\n"

    def share(count: int) -> str:
        return f"{100 * count / profile.samples:.1f} %"

    lines = [
        f"{profile.samples} samples of a thread that was not idle.",
        "",
        "| self | function | file |",
        "|---:|---|---|",
    ]
    for (function, location), count in profile.self_counts.most_common(top):
        lines.append(f"| {share(count)} | `{function}` | {location} |")
    lines += ["", "| inclusive | function | file |", "|---:|---|---|"]
    inclusive = [
        (frame, count)
        for frame, count in profile.inclusive_counts.most_common()
        if not _is_entry_frame(frame)
    ]
    for (function, location), count in inclusive[:top]:
        lines.append(f"| {share(count)} | `{function}` | {location} |")
    lines += ["", "| self, by package or module | share |", "|---|---:|"]
    for package, count in profile.package_counts.most_common(top):
        lines.append(f"| {package} | {share(count)} |")
    return "\n".join(lines) + "\n"
