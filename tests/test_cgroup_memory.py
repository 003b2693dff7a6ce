"""Free RAM as the process's memory cgroup allows it, not as the machine has it.

Unit tests build fake cgroup v1 / v2 trees in tmp_path; one test, as root on Linux with
cgroup v1's memory controller mounted, runs a process in a real 4 GiB cgroup.
"""

from __future__ import annotations

import functools
from collections import namedtuple
from pathlib import Path

import pytest

from cgroup import memory_cgroup, run_in, why_not
from devicemap import devices
from devicemap.devices import CPU, cpu_memory, inventory

GIB = 2**30
RAM = namedtuple("RAM", "available total")(available=48 * GIB, total=64 * GIB)


@pytest.fixture(autouse=True)
def _machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """psutil reports a 64 GiB machine with 48 GiB available, whatever this one has."""
    monkeypatch.setattr(devices.psutil, "virtual_memory", lambda: RAM)


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def memory(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[int, int]:
    """cpu_memory() with /proc/self/cgroup reading `proc` and /sys/fs/cgroup holding `files`."""
    (tmp_path / "cgroup").write_text(proc)
    root = write_tree(tmp_path / "fs", files)
    return cpu_memory(proc_cgroup=tmp_path / "cgroup", cgroup_root=root)


V1_PROC = "5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n1:name=systemd:/docker/abc\n0::/\n"


# --- cgroup v2 ------------------------------------------------------------------


def test_v2_limit_less_usage_plus_inactive_file(tmp_path: Path) -> None:
    files = {
        "app/memory.max": f"{4 * GIB}\n",
        "app/memory.current": f"{GIB}\n",
        "app/memory.stat": f"anon 123\nfile 999\ninactive_file {GIB // 2}\nactive_file 7\n",
    }
    assert memory(tmp_path, "0::/app\n", files) == (4 * GIB - GIB + GIB // 2, 4 * GIB)


def test_v2_no_limit_is_the_machine(tmp_path: Path) -> None:
    files = {"app/memory.max": "max\n", "app/memory.high": "max\n", "app/memory.current": "5\n"}
    assert memory(tmp_path, "0::/app\n", files) == (RAM.available, RAM.total)


def test_v2_parent_limit_counts(tmp_path: Path) -> None:
    files = {
        "user.slice/memory.max": f"{8 * GIB}",
        "user.slice/memory.current": f"{6 * GIB}",  # other processes of the slice use 6 GiB
        "user.slice/app.scope/memory.max": "max",
        "user.slice/app.scope/memory.current": f"{GIB}",
    }
    assert memory(tmp_path, "0::/user.slice/app.scope\n", files) == (2 * GIB, 8 * GIB)


def test_v2_memory_high_counts(tmp_path: Path) -> None:
    files = {"memory.max": f"{8 * GIB}", "memory.high": f"{3 * GIB}", "memory.current": f"{GIB}"}
    assert memory(tmp_path, "0::/\n", files) == (2 * GIB, 3 * GIB)  # a container's own root


def test_v2_over_the_limit_is_zero_free(tmp_path: Path) -> None:
    files = {"memory.max": f"{GIB}", "memory.current": f"{GIB + 4096}", "memory.stat": ""}
    assert memory(tmp_path, "0::/\n", files) == (0, GIB)


def test_v2_in_a_hybrid_tree_without_memory_is_ignored(tmp_path: Path) -> None:
    files = {"unified/app/cgroup.procs": "1\n"}  # v2 mounted beside v1, memory not on it
    assert memory(tmp_path, "1:name=systemd:/app\n0::/app\n", files) == (RAM.available, RAM.total)


# --- cgroup v1 ------------------------------------------------------------------


def test_v1_limit_less_usage_plus_total_inactive_file(tmp_path: Path) -> None:
    files = {
        "memory/docker/abc/memory.limit_in_bytes": f"{4 * GIB}\n",
        "memory/docker/abc/memory.usage_in_bytes": f"{3 * GIB}\n",
        "memory/docker/abc/memory.stat": f"inactive_file 1\ntotal_inactive_file {GIB}\n",
        "memory/memory.limit_in_bytes": "9223372036854771712\n",  # the root: no limit
        "memory/memory.usage_in_bytes": f"{40 * GIB}\n",
    }
    assert memory(tmp_path, V1_PROC, files) == (2 * GIB, 4 * GIB)


def test_v1_inactive_file_when_no_total(tmp_path: Path) -> None:
    files = {
        "memory/docker/abc/memory.limit_in_bytes": f"{4 * GIB}",
        "memory/docker/abc/memory.usage_in_bytes": f"{3 * GIB}",
        "memory/docker/abc/memory.stat": f"cache 5\ninactive_file {GIB // 4}\n",
    }
    assert memory(tmp_path, V1_PROC, files) == (GIB + GIB // 4, 4 * GIB)


def test_v1_unlimited_is_the_machine(tmp_path: Path) -> None:
    files = {
        "memory/docker/abc/memory.limit_in_bytes": "9223372036854771712",
        "memory/docker/abc/memory.usage_in_bytes": f"{GIB}",
    }
    assert memory(tmp_path, V1_PROC, files) == (RAM.available, RAM.total)


def test_v1_container_sees_its_own_cgroup_as_the_root(tmp_path: Path) -> None:
    """Without a cgroup namespace /proc says /docker/abc, but the mount shows only that cgroup."""
    files = {
        "memory/memory.limit_in_bytes": f"{16 * GIB}",
        "memory/memory.usage_in_bytes": f"{2 * GIB}",
    }
    assert memory(tmp_path, V1_PROC, files) == (14 * GIB, 16 * GIB)


def test_v1_wins_over_v2_in_a_hybrid_tree(tmp_path: Path) -> None:
    files = {
        "memory/docker/abc/memory.limit_in_bytes": f"{4 * GIB}",
        "memory/docker/abc/memory.usage_in_bytes": "0",
        "memory.max": f"{GIB}",  # not where this process's memory controller is
    }
    assert memory(tmp_path, V1_PROC, files) == (4 * GIB, 4 * GIB)


# --- what cannot be read sets no limit -----------------------------------------


@pytest.mark.parametrize(
    ("proc", "files"),
    [
        ("", {}),
        ("garbage without colons\n", {}),
        ("0::/app\n", {}),
        ("0::/app\n", {"app/memory.max": "lots", "app/memory.current": "x"}),
        ("0::/app\n", {"app/memory.max": "-5", "app/memory.current": "1"}),
        ("0::/app\n", {"app/memory.max": "9" * 400, "app/memory.current": "1"}),
        ("0::/app\n", {"app/memory.max": "\u00b2", "app/memory.current": "1"}),  # isdigit()
        ("4:memory:/x\n", {"memory/x/memory.limit_in_bytes": ""}),
        ("4:memory:/../../etc\n", {"memory/memory.limit_in_bytes": "unlimited"}),
    ],
)
def test_unreadable_cgroups_are_no_limit(tmp_path: Path, proc: str, files: dict[str, str]) -> None:
    assert memory(tmp_path, proc, files) == (RAM.available, RAM.total)


def test_garbage_stat_is_no_reclaimable(tmp_path: Path) -> None:
    files = {
        "memory.max": f"{4 * GIB}",
        "memory.current": f"{GIB}",
        "memory.stat": "inactive_file lots\nnonsense\n\ninactive_file\ninactive_file \u00b2\n",
    }
    assert memory(tmp_path, "0::/\n", files) == (3 * GIB, 4 * GIB)


def test_no_proc_file_is_the_machine(tmp_path: Path) -> None:
    free = cpu_memory(proc_cgroup=tmp_path / "absent", cgroup_root=tmp_path)
    assert free == (RAM.available, RAM.total)


def test_inventory_reports_the_cgroup_figure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cgroup").write_text("0::/app\n")
    root = write_tree(tmp_path / "fs", {"app/memory.max": f"{GIB}", "app/memory.current": "0"})
    fake = functools.partial(cpu_memory, proc_cgroup=tmp_path / "cgroup", cgroup_root=root)
    monkeypatch.setattr(devices, "cpu_memory", fake)
    inv = inventory(offload_dir=tmp_path)
    assert (inv.free[CPU], inv.total[CPU]) == (GIB, GIB)


# --- a real cgroup ------------------------------------------------------------

CHILD = """
import psutil
from devicemap.devices import CPU, inventory
print(psutil.virtual_memory().available, inventory().free[CPU])
"""


@pytest.mark.skipif(why_not() is not None, reason=str(why_not()))
def test_real_v1_cgroup_limit() -> None:
    """A process in a 4 GiB memory cgroup is told at most 4 GiB is free, whatever the machine."""
    try:
        with memory_cgroup(4 * GIB) as group:
            run = run_in(group, CHILD, [], timeout=120)
    except PermissionError as e:  # read-only /sys, no permission in this container
        pytest.skip(f"cannot create a memory cgroup: {e}")
    assert run.returncode == 0, run.stderr[-2000:]
    machine, free = map(int, run.stdout.split()[-2:])
    assert 0 < free <= 4 * GIB
    assert free > 2 * GIB  # python and torch use far less than 2 GiB of the 4
    if machine > 4 * GIB:
        assert free < machine  # the cgroup, not psutil, set the figure
