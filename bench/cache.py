"""What checking the offload cache by content costs: a load that reuses a converted cache,
first in a fresh process (every tensor's xxh3-128 digest verified) vs again in the same
process (verified already: the header alone is read).

TinyLlama-1.1B's shape saved in float32, planned in bfloat16 with every block on disk, so
every tensor is converted into the cache (2.2 GB). Each round runs in new processes: one
loads twice (verifying, then not), so the ratio is measured in one process, warm page cache.

    python bench/cache.py              # 5 rounds
    python bench/cache.py --rounds 3 --model smollm
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

from models import bench_model
from report import median, write

_CHILD = textwrap.dedent(
    """
    import json, sys, time
    import torch
    import devicemap
    from devicemap.model.skeleton import build_skeleton

    def once():
        skeleton = build_skeleton(sys.argv[1], dtype=torch.bfloat16)
        pins = {b.name: "disk" for b in skeleton.blocks}
        start = time.perf_counter()
        model = devicemap.load(skeleton, max_memory={"cpu": "64GiB", "disk": "64GiB"},
                               pins=pins, offload_exec="cpu", context=64,
                               offload_dir=sys.argv[2], progress=False)
        took = time.perf_counter() - start
        devicemap.release(model)
        return took

    print(json.dumps([once(), once()]))
    """
)


def loads(path: Path, offload: Path) -> list[float]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(offload)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return [float(x) for x in json.loads(out.stdout.strip().splitlines()[-1])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default="tinyllama", choices=["tinyllama", "smollm"])
    args = parser.parse_args()
    path = bench_model(args.model, torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        offload = Path(tmp) / "offload"
        write_s = loads(path, offload)[0]  # the first load converts and writes the cache
        size = sum(f.stat().st_size for f in offload.glob("*.safetensors"))
        verified, trusted = [], []
        for _ in range(args.rounds):
            first, second = loads(path, offload)
            verified.append(first)
            trusted.append(second)
    row = {
        "model": f"{args.model} fp32 -> bf16, all on disk",
        "cache_GB": size / 1e9,
        "convert_load_s": write_s,
        "reuse_verified_s": median(verified),
        "reuse_trusted_s": median(trusted),
        "verified/trusted": median(verified) / median(trusted),
        "verify_GB_s": size / 1e9 / max(median(verified) - median(trusted), 1e-9),
    }
    command = f"python bench/cache.py --rounds {args.rounds} --model {args.model}"
    write("cache", [row], notes={"command": command})


if __name__ == "__main__":
    main()
