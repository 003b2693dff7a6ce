"""Decode tokens/s with blocks offloaded to disk, CPU execution: devicemap vs accelerate.

Both run the same device map (devicemap plans it; transformers + accelerate get
`device_map=plan.device_map`) in one process, alternating, and are compared with the
same model held fully in RAM. Warm: page cache warm. Cold: before every decode step
the offloaded files are evicted from the page cache, and the step is compared with the
disk bound (offloaded bytes / measured sequential read speed of the same files).

    python bench/decode.py                      # smollm fp32 + tinyllama bf16, 0/50/75 % on disk
    python bench/decode.py --models smollm --fractions 0.75 --cold-rounds 3
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

import devicemap
from devicemap.run import offload as offload_module
from devicemap.run.pages import file_mappings
from models import bench_model, decoder_layers
from report import median, write

MODELS = {"smollm": torch.float32, "tinyllama": torch.bfloat16}
_libc = ctypes.CDLL(None, use_errno=True)


def disk_pins(path: Path, fraction: float) -> dict[str, str]:
    """The last `fraction` of the decoder layers on disk, as pins."""
    n = decoder_layers(path)
    first = n - round(fraction * n)
    return {f"model.layers.{i}": "disk" for i in range(first, n)}


def plan_options(path: Path, fraction: float) -> dict[str, Any]:
    """The planning options of every CPU-execution benchmark: `fraction` of layers on disk."""
    return {
        "max_memory": {"cpu": "20GiB", "disk": "200GiB"},
        "pins": disk_pins(path, fraction),
        "offload_exec": "cpu",
        "context": 512,
    }


def load_devicemap(path: Path, dtype: torch.dtype, fraction: float) -> Any:
    return devicemap.load(path, dtype=dtype, progress=False, **plan_options(path, fraction))


def load_accelerate(path: Path, dtype: torch.dtype, device_map: dict[str, Any], tmp: str) -> Any:
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, device_map=device_map, offload_folder=tmp
    ).eval()


def warm_rates(ram: Any, dm: Any, acc: Any, *, runs: int, tokens: int) -> dict[str, float]:
    """Median decode tok/s of the model in RAM, devicemap and accelerate, `runs` rounds
    alternating (so drift hits all three alike), and devicemap's ratios to the other two."""
    times: dict[str, list[float]] = {"ram": [], "devicemap": [], "accelerate": []}
    for _ in range(runs):
        for name, model in (("ram", ram), ("devicemap", dm), ("accelerate", acc)):
            times[name].append(1 / decode_steps(model, tokens))
    rate = {name: median(v) for name, v in times.items()}
    row = {f"{k}_tok_s": v for k, v in rate.items()}
    row["dm/ram"] = rate["devicemap"] / rate["ram"]
    row["dm/acc"] = rate["devicemap"] / rate["accelerate"]
    return row


def decode_steps(
    model: Any,
    steps: int,
    before_step: Callable[[], None] | None = None,
    *,
    device: str = "cpu",
) -> float:
    """Median seconds per decode step after a 16-token prefill (greedy, KV cache).

    On cuda the device is synchronised around each step: the benchmark's clock, not the
    hot path's."""
    ids = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    with torch.inference_mode():
        out = model(ids.to(device), use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            if before_step is not None:
                before_step()
            sync()
            start = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            sync()
            times.append(time.perf_counter() - start)
    return median(times)


Ranges = dict[Path, list[tuple[int, int]]]  # file -> [(offset, bytes)] of offloaded tensors


def offloaded(path: Path, device_map: dict[str, Any]) -> tuple[Ranges, int]:
    """Where the disk-stored tensors lie in the checkpoint's files, and their total bytes."""
    from devicemap.model.checkpoint import read_index, resolve_model

    index = read_index(resolve_model(path))
    disk = tuple(f"{name}." for name, dev in device_map.items() if dev == "disk")
    ranges: Ranges = {}
    for key, t in index.tensors.items():
        if key.startswith(disk):
            ranges.setdefault(t.file.resolve(), []).append((t.offset, t.nbytes))
    return ranges, sum(n for spans in ranges.values() for _, n in spans)


def evict(ranges: Ranges) -> None:
    """Drop the offloaded tensors' bytes (only those) from the page cache.

    Mapped pages are not dropped by fadvise, so every mapping of those bytes in this
    process (devicemap's views, safetensors' handles) is first un-populated with
    MADV_DONTNEED: the next touch re-reads them from the (now cold) file. Pages of the
    same files that hold cpu-stored weights stay: in RAM is where the plan keeps them.
    """
    page = os.sysconf("SC_PAGE_SIZE")
    for mapping in file_mappings() or []:
        file = Path(mapping.path)
        if file not in ranges:
            continue
        base = mapping.start - mapping.offset  # the address of file offset 0
        for offset, nbytes in ranges[file]:
            lo = max(mapping.start, (base + offset) // page * page)
            hi = min(mapping.end, base + offset + nbytes)
            if lo < hi:
                _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)
    for file, spans in ranges.items():
        fd = os.open(file, os.O_RDONLY)
        try:
            for offset, nbytes in spans:
                os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def settle(model: Any) -> None:
    """Wait until devicemap's page prefetcher has done what it was asked.

    At the end of a step it already faults in the next step's first disk blocks (the
    wrap-around): useful when tokens follow each other, wasted when the benchmark evicts
    between steps, and it would run on into the next timed step. Settled first, every
    cold step starts with the offloaded bytes all out of memory and no read under way."""
    state = model.__dict__.get("_devicemap_dispatch")  # dispatch.py's _STATE
    for offload in state.offloads if state is not None else ():
        getattr(offload, "wait", lambda: None)()


def cold_start(model: Any, ranges: Ranges) -> Callable[[], None]:
    return lambda: (settle(model), evict(ranges))[-1]


def read_speed(ranges: Ranges) -> float:
    """Cold sequential read speed of the offloaded bytes in bytes/s (16 MiB reads, in order)."""
    evict(ranges)  # the loaded models map these files: plain fadvise would leave them cached
    total, start = 0, time.perf_counter()
    for file, spans in ranges.items():
        with open(file, "rb", buffering=0) as fh:
            for offset, nbytes in sorted(spans):
                fh.seek(offset)
                left = nbytes
                while left > 0 and (chunk := fh.read(min(16 << 20, left))):
                    left -= len(chunk)
                    total += len(chunk)
    return total / (time.perf_counter() - start)


def bench_one(shape: str, fraction: float, args: argparse.Namespace) -> dict[str, Any]:
    dtype = MODELS[shape]
    path = bench_model(shape, dtype)
    row: dict[str, Any] = {"model": f"{shape} {str(dtype)[6:]}", "on_disk": f"{fraction:.0%}"}
    dm = load_devicemap(path, dtype, fraction)
    device_map = dict(dm.devicemap_plan.device_map)
    with tempfile.TemporaryDirectory() as tmp:
        acc = load_accelerate(path, dtype, device_map, tmp)
        ram = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        row.update(warm_rates(ram, dm, acc, runs=args.runs, tokens=args.tokens))
        if fraction > 0 and args.cold_rounds:
            row.update(cold(path, device_map, dm, acc, args.cold_rounds))
        del acc, ram
    devicemap.release(dm)
    gc.collect()
    return row


def cold(path: Path, device_map: dict[str, Any], dm: Any, acc: Any, rounds: int) -> dict[str, Any]:
    """Per round: one cold sequential read of the files (the bound), then two cold decode
    steps of each engine. Interleaved, because this disk's speed drifts 2x within minutes."""
    ranges, nbytes = offloaded(path, device_map)
    reads, dm_steps, acc_steps = [], [], []
    for _ in range(rounds):
        reads.append(nbytes / read_speed(ranges))  # seconds to read every offloaded byte once
        dm_steps.append(decode_steps(dm, 2, cold_start(dm, ranges)))
        acc_steps.append(decode_steps(acc, 2, cold_start(acc, ranges)))
    bound = 1 / median(reads)  # tokens/s if each step had to read every offloaded byte once
    dm_rate, acc_rate = 1 / median(dm_steps), 1 / median(acc_steps)
    return {
        "offloaded_MB": nbytes / 1e6,
        "read_MB_s": nbytes / median(reads) / 1e6,
        "cold_bound_tok_s": bound,
        "cold_dm_tok_s": dm_rate,
        "cold_acc_tok_s": acc_rate,
        "cold_dm/bound": dm_rate / bound,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm,tinyllama")
    parser.add_argument("--fractions", default="0,0.5,0.75")
    parser.add_argument("--tokens", type=int, default=24, help="decode steps per run")
    parser.add_argument("--runs", type=int, default=5, help="runs per engine (median)")
    parser.add_argument("--cold-rounds", type=int, default=9, help="cold rounds; 0 skips")
    parser.add_argument("--lookahead-mib", type=int, help="page prefetch look-ahead (64)")
    args = parser.parse_args()
    if args.lookahead_mib is not None:  # blocks ahead = this / block size, 2 to 8
        offload_module.LOOKAHEAD = args.lookahead_mib << 20
    torch.set_num_threads(os.cpu_count() or 1)
    rows = [
        bench_one(shape, float(fraction), args)
        for shape in args.models.split(",")
        for fraction in args.fractions.split(",")
    ]
    write("decode", rows, notes={"command": "python bench/decode.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())})  # fmt: skip


if __name__ == "__main__":
    main()
