"""Run a child process inside a memory-limited cgroup (v1, as root): how tests and
benchmarks check "larger than RAM" at small scale. The cgroup is always removed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

V1_MEMORY = Path("/sys/fs/cgroup/memory")
SRC = Path(__file__).resolve().parents[1] / "src"


def why_not() -> str | None:
    """Why a memory cgroup cannot be made here (None: it can)."""
    if not sys.platform.startswith("linux") or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "creating a cgroup needs root on Linux"
    if not (V1_MEMORY / "cgroup.procs").is_file():
        return "cgroup v1 memory is not mounted at /sys/fs/cgroup/memory"
    return None


@contextmanager
def memory_cgroup(limit: int) -> Iterator[Path]:
    """A fresh v1 memory cgroup limited to `limit` bytes (swap off in it); removed after."""
    group = V1_MEMORY / f"devicemap-test-{os.getpid()}-{time.monotonic_ns()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        swappiness = group / "memory.swappiness"
        if swappiness.exists():
            swappiness.write_text("0")
        yield group
    finally:
        remove(group)


def run_in(
    group: Path, code: str, args: Sequence[str], *, timeout: float, cwd: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -c code *args` inside `group`: the shell joins it, then becomes python, so
    everything it allocates (and the page cache it fills) is charged to the cgroup."""
    join = 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"'
    path = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    return subprocess.run(
        ["sh", "-c", join, "sh", str(group), sys.executable, "-c", code, *args],
        capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd,
        env={**os.environ, "PYTHONPATH": path},
    )  # fmt: skip


def remove(group: Path) -> None:
    """rmdir the cgroup once its processes are gone (the kernel may take a moment)."""
    for _ in range(50):
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)
    group.rmdir()  # raise, so a cgroup left behind is seen
