"""Devices and memory budgets, normalised once at the boundary.

Inside devicemap a device is always a `Device` and a budget always an int of
bytes; nothing compares device strings or re-derives "the main device".
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import psutil
import torch

from .errors import BadSize, DuplicateDevice, UnknownDevice

Kind = Literal["cuda", "mps", "cpu", "disk"]
_KIND_RANK = {"cuda": 0, "mps": 1, "cpu": 2, "disk": 3}

SizeLike = int | str


@dataclass(frozen=True)
class Device:
    """One place that can hold weights: a GPU, the CPU RAM or the disk."""

    kind: Kind
    index: int = 0  # only meaningful for cuda

    def __str__(self) -> str:
        return f"cuda:{self.index}" if self.kind == "cuda" else self.kind

    def __repr__(self) -> str:
        return f"Device({str(self)!r})"

    @property
    def is_gpu(self) -> bool:
        return self.kind in ("cuda", "mps")

    @property
    def map_value(self) -> int | str:
        """The value accelerate/transformers device maps use: 0 for cuda:0, else the name."""
        return self.index if self.kind == "cuda" else self.kind

    @property
    def sort_key(self) -> tuple[int, int]:
        """GPUs by index first, then mps, cpu, disk."""
        return (_KIND_RANK[self.kind], self.index)

    def torch(self) -> torch.device:
        """The torch device that tensors on this device live on (disk data is read to cpu)."""
        if self.kind == "disk":
            return torch.device("cpu")
        return torch.device(str(self))


DeviceLike = int | str | torch.device | Device

CPU = Device("cpu")
DISK = Device("disk")

_DEVICE_RE = re.compile(r"^(?:(cuda|gpu)(?::(\d+))?|(\d+)|(cpu|disk|meta|mps))$")


def parse_device(value: DeviceLike) -> Device:
    """Parse 0, "0", "cuda", "cuda:1", "cpu", "disk", "mps" or a torch.device."""
    if isinstance(value, Device):
        return value
    if isinstance(value, bool):
        raise UnknownDevice(f"device {value!r} is not a device; use 0, 'cuda:1', 'cpu' or 'disk'")
    if isinstance(value, int):
        if value < 0:
            raise UnknownDevice(f"device {value} is negative; GPU indices start at 0")
        return Device("cuda", value)
    if isinstance(value, torch.device):
        value = str(value)
    if not isinstance(value, str):
        raise UnknownDevice(f"device {value!r} is not a device; use 0, 'cuda:1', 'cpu' or 'disk'")
    match = _DEVICE_RE.match(value.strip().lower())
    if match is None or match.group(4) == "meta":
        raise UnknownDevice(
            f"unknown device {value!r}; use a GPU index (0), 'cuda:N', 'cpu', 'disk' or 'mps'"
        )
    if match.group(1):
        return Device("cuda", int(match.group(2) or 0))
    if match.group(3):
        return Device("cuda", int(match.group(3)))
    name = match.group(4)
    return Device("mps") if name == "mps" else (CPU if name == "cpu" else DISK)


def parse_devices(values: Iterable[DeviceLike]) -> list[Device]:
    """Parse several devices; the same device twice is an error naming both spellings."""
    seen: dict[Device, DeviceLike] = {}
    for value in values:
        device = parse_device(value)
        if device in seen:
            raise DuplicateDevice(
                f"device {value!r} and {seen[device]!r} are both {device}; give each device once"
            )
        seen[device] = value
    return list(seen)


_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*|%)\s*$")


def parse_size(value: SizeLike, *, free: int | None = None) -> int:
    """Bytes from 123, "16GiB" (binary), "16GB" (decimal), "512MiB" or "85%" of `free`."""
    if isinstance(value, bool):
        raise BadSize(f"memory size {value!r} is not a size; use bytes, '16GiB' or '85%'")
    if isinstance(value, int):
        if value < 0:
            raise BadSize(f"memory size {value} is negative; give a size of 0 or more bytes")
        return value
    if not isinstance(value, str):
        raise BadSize(f"memory size {value!r} is not a size; use bytes, '16GiB' or '85%'")
    match = _SIZE_RE.match(value)
    if match is None:
        raise BadSize(
            f"memory size {value!r} is not understood; write a non-negative number and a unit,"
            " like '16GiB', '16GB', '512MiB', '1024' (bytes) or '85%'"
        )
    number, unit = float(match.group(1)), match.group(2).lower()
    if unit == "%":
        if not 0 < number <= 100:
            raise BadSize(f"memory size {value!r}: a percentage must be above 0 and at most 100")
        if free is None:
            raise BadSize(
                f"memory size {value!r} is a percentage, but how much is free on that device is"
                " unknown; give an absolute size such as '16GiB'"
            )
        return int(free * number / 100)
    if unit not in _UNITS and unit != "":
        raise BadSize(
            f"memory size {value!r} has an unknown unit {match.group(2)!r};"
            " use B, KB, MB, GB, TB (decimal) or KiB, MiB, GiB, TiB (binary)"
        )
    return int(number * _UNITS.get(unit, 1))


def format_size(nbytes: int | float) -> str:
    """'1.50 GiB', '512.0 MiB', '-2.00 GiB': binary units, three significant-ish digits."""
    sign, value = ("-" if nbytes < 0 else ""), abs(float(nbytes))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{sign}{value:.0f} {unit}" if unit == "B" else f"{sign}{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Inventory:
    """What is free right now on each device of this machine, in bytes."""

    free: Mapping[Device, int]
    total: Mapping[Device, int]

    @property
    def gpus(self) -> list[Device]:
        return sorted((d for d in self.free if d.is_gpu), key=lambda d: d.sort_key)


def inventory(*, offload_dir: str | os.PathLike[str] | None = None) -> Inventory:
    """Free memory now: each GPU (memory held by other processes counts), RAM, disk."""
    free: dict[Device, int] = {}
    total: dict[Device, int] = {}
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free_bytes, total_bytes = torch.cuda.mem_get_info(index)
            free[Device("cuda", index)], total[Device("cuda", index)] = free_bytes, total_bytes
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        ram = psutil.virtual_memory()  # mps shares the unified memory with the CPU
        free[Device("mps")], total[Device("mps")] = ram.available, ram.total
    ram = psutil.virtual_memory()
    free[CPU], total[CPU] = ram.available, ram.total
    disk = shutil.disk_usage(_existing_parent(offload_dir or os.getcwd()))
    free[DISK], total[DISK] = disk.free, disk.total
    return Inventory(free=free, total=total)


def present(device: Device) -> bool:
    """Whether this machine has `device` (cpu and disk: always)."""
    if device.kind == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    if device.kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        return mps is not None and bool(mps.is_available())
    return True


def _existing_parent(path: str | os.PathLike[str]) -> str:
    path = os.path.abspath(os.fspath(path))
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def select_gpus(
    inv: Inventory, gpus: int | Iterable[DeviceLike] | None, *, where: str = "this machine"
) -> list[Device]:
    """GPUs to use: all (None), the first N (an int), or the listed ids, among `inv`'s."""
    available = inv.gpus
    if gpus is None:
        return available
    if isinstance(gpus, bool):
        raise UnknownDevice(f"gpus={gpus!r}: give a number of GPUs or a list of GPU ids")
    if isinstance(gpus, int):
        if gpus > len(available):
            raise UnknownDevice(
                f"--gpus {gpus} asks for more GPUs than {where} has ({len(available)});"
                " to plan for GPUs you do not have, give --max-memory for each"
            )
        return available[:gpus]
    chosen = parse_devices(gpus)
    missing = [str(d) for d in chosen if d not in inv.free]
    if missing:
        raise UnknownDevice(
            f"GPU(s) {', '.join(missing)} not found in {where} (it has"
            f" {', '.join(map(str, available)) or 'none'}); to plan for GPUs you do not have,"
            " give --max-memory for each"
        )
    return chosen


def resolve_budgets(
    max_memory: Mapping[DeviceLike, SizeLike] | None,
    *,
    inv: Inventory | None = None,
    gpus: int | Iterable[DeviceLike] | None = None,
) -> dict[Device, int]:
    """Budgets in bytes per device, in placement order (GPUs, mps, cpu, disk).

    With `max_memory`, exactly the devices it names are used (devices this machine
    does not have are fine: that is what-if planning), and percentages are of what
    is free now; `gpus` then keeps only those of its GPUs (the first N, or the
    listed ids). Without it, every selected GPU, the CPU RAM and the disk get what
    is free now.
    """
    if max_memory is None:
        inv = inv or inventory()
        devices = [*select_gpus(inv, gpus), CPU, DISK]
        budgets = {d: inv.free.get(d, 0) for d in devices}
    else:
        keys = parse_devices(max_memory.keys())
        if any(str(v).strip().endswith("%") for v in max_memory.values()):
            inv = inv or inventory()
        budgets = {}
        for device, value in zip(keys, max_memory.values(), strict=True):
            free = inv.free.get(device) if inv is not None else None
            budgets[device] = parse_size(value, free=free)
        if gpus is not None:  # keep only the selected ones among the budgeted GPUs
            budgeted = Inventory(free=budgets, total=budgets)
            chosen = select_gpus(budgeted, gpus, where="--max-memory")
            budgets = {d: b for d, b in budgets.items() if not d.is_gpu or d in chosen}
    return dict(sorted(budgets.items(), key=lambda item: item[0].sort_key))
