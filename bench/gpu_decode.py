"""GPU decode with CPU-stored blocks streamed in: devicemap vs accelerate vs the PCIe bound.

Needs CUDA. The last `fraction` of the decoder layers are stored in CPU RAM and execute on
cuda:0 (devicemap: one pinned staging arena, a side stream, double-buffered; accelerate:
its hooks copy each module's weights on every forward). The bound is the time to move
the offloaded bytes once per token at the measured pinned host-to-device bandwidth.

    python bench/gpu_decode.py                  # tinyllama bf16, 50 % and 75 % on cpu
    python bench/gpu_decode.py --fractions 0.9 --tokens 32
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

import devicemap
from decode import decode_steps, disk_pins
from models import bench_model
from report import median, write


def h2d_bandwidth(nbytes: int = 256 << 20, repeats: int = 10) -> float:
    """Pinned host -> device copy speed in bytes/s (median of `repeats`, CUDA events)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(repeats + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dev.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return nbytes / median(times[2:])


def cpu_pins(path: Path, fraction: float) -> dict[str, str]:
    return {name: "cpu" for name in disk_pins(path, fraction)}


def bench_one(path: Path, dtype: torch.dtype, fraction: float, args: Any) -> dict[str, Any]:
    budgets = {0: "60GiB", "cpu": "60GiB"}
    dm = devicemap.load(path, dtype=dtype, max_memory=budgets, pins=cpu_pins(path, fraction),
                        offload_exec="gpu", context=512, progress=False)  # fmt: skip
    plan = dm.devicemap_plan
    offloaded = sum(u.weights for u in plan.devices if str(u.device) == "cpu")  # bytes
    acc = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=plan.device_map)
    resident = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": 0})
    runs: dict[str, list[float]] = {"resident": [], "devicemap": [], "accelerate": []}
    for _ in range(args.runs):  # alternate, so drift hits all three alike
        for name, model in (("resident", resident), ("devicemap", dm), ("accelerate", acc)):
            runs[name].append(1 / decode_steps(model, args.tokens, device="cuda"))
    rate = {name: median(v) for name, v in runs.items()}
    bandwidth = h2d_bandwidth()
    bound = bandwidth / offloaded  # tokens/s if each step moved every offloaded byte once
    devicemap.release(dm)
    return {
        "model": path.name,
        "on_cpu": f"{fraction:.0%}",
        "offloaded_MB": offloaded / 1e6,
        "h2d_GB_s": bandwidth / 1e9,
        "bound_tok_s": bound,
        **{f"{k}_tok_s": v for k, v in rate.items()},
        "dm/bound": rate["devicemap"] / bound,
        "dm/acc": rate["devicemap"] / rate["accelerate"],
        "peak_GB": torch.cuda.max_memory_allocated() / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tinyllama")
    parser.add_argument("--fractions", default="0.5,0.75")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_decode.py needs a CUDA device")
    dtype = torch.bfloat16
    path = bench_model(args.model, dtype)
    rows = [bench_one(path, dtype, float(f), args) for f in args.fractions.split(",")]
    write("gpu_decode", rows, notes={"command": "python bench/gpu_decode.py", "args": vars(args)})


if __name__ == "__main__":
    main()
