"""Load time and peak RSS: devicemap.load vs from_pretrained(device_map=the same map).

Each load runs in a fresh subprocess (peak RSS is per process), alternating engines,
with the page cache warm (one untimed read of the files first). "ready" adds the first
forward (16 tokens): transformers maps CPU weights lazily and pays for them there; only
load + first forward compares the same work. Peak RSS is taken after that forward (file
pages that were touched count); "anon" is the growth of anonymous memory by then, the part
of RSS the kernel cannot reclaim (mapped checkpoint pages it can).

    python bench/load.py                       # tinyllama bf16, 0 % and 75 % of layers on disk
    python bench/load.py --models smollm --fractions 0.5 --runs 5
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from decode import MODELS, load_devicemap, plan_options
from devicemap.cli.measure import read_rss
from models import bench_model
from report import median, write


def child(engine: str, shape: str, fraction: float) -> None:
    """Load once and print {"seconds", "peak_rss"} as JSON (runs in its own process)."""
    dtype = MODELS[shape]
    path = bench_model(shape, dtype)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes, after imports
    base_anon = read_rss().get("anon", 0)
    start = time.perf_counter()
    if engine == "devicemap":
        model = load_devicemap(path, dtype, fraction)
    else:
        import tempfile

        from transformers import AutoModelForCausalLM

        plan = _plan(path, dtype, fraction)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, device_map=plan.device_map, offload_folder=tempfile.mkdtemp()
        )
    seconds = time.perf_counter() - start
    with torch.inference_mode():
        model(torch.arange(3, 19).unsqueeze(0))  # [1, 16]: touches every weight once
    ready = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    anon = read_rss().get("anon", 0)  # bytes of RSS the kernel cannot reclaim (no swap)
    print(json.dumps({"seconds": seconds, "ready": ready, "peak_rss": peak,
                      "rss_growth": peak - base, "anon": anon - base_anon}))  # fmt: skip


def _plan(path: Path, dtype: torch.dtype, fraction: float) -> Any:
    import devicemap

    return devicemap.plan(path, dtype=dtype, **plan_options(path, fraction))


def run_child(engine: str, shape: str, fraction: float) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", engine, "--models", shape]
    cmd += ["--fractions", str(fraction)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def warm(path: Path) -> None:
    for f in path.glob("*.safetensors"):
        f.read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tinyllama")
    parser.add_argument("--fractions", default="0,0.75")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", choices=["devicemap", "transformers"])
    args = parser.parse_args()
    if args.child:
        child(args.child, args.models, float(args.fractions))
        return
    rows = []
    for shape in args.models.split(","):
        warm(bench_model(shape, MODELS[shape]))
        for fraction in map(float, args.fractions.split(",")):
            runs: dict[str, list[dict[str, float]]] = {"devicemap": [], "transformers": []}
            for _ in range(args.runs):
                for engine in runs:
                    runs[engine].append(run_child(engine, shape, fraction))
            row: dict[str, Any] = {"model": shape, "on_disk": f"{fraction:.0%}"}
            for engine, results in runs.items():
                row[f"{engine}_s"] = median([r["seconds"] for r in results])
                row[f"{engine}_ready_s"] = median([r["ready"] for r in results])
                row[f"{engine}_peak_MB"] = median([r["peak_rss"] for r in results]) / 1e6
                row[f"{engine}_growth_MB"] = median([r["rss_growth"] for r in results]) / 1e6
                row[f"{engine}_anon_MB"] = median([r["anon"] for r in results]) / 1e6
            row["load dm/tf"] = row["devicemap_s"] / row["transformers_s"]
            row["ready dm/tf"] = row["devicemap_ready_s"] / row["transformers_ready_s"]
            row["peak dm/tf"] = row["devicemap_peak_MB"] / row["transformers_peak_MB"]
            rows.append(row)
    write("load", rows, notes={"command": " ".join(["python bench/load.py", *sys.argv[1:]])})


if __name__ == "__main__":
    main()
