"""MoE decode with the routed experts on disk, CPU execution: devicemap vs RAM vs accelerate.

A random Qwen3-MoE-shaped model (hidden 1024, 12 layers, 64 experts, top-4, bf16, 2.6 GB,
saved per expert as hub checkpoints are), its dense parts in RAM and every layer's routed
experts on disk (`--pin model.layers.*.mlp.experts=disk`, computed by the CPU):

- warm: decode tokens/s vs the same model in RAM (plain transformers) and vs transformers +
  accelerate on the same device map, alternating in one process;
- written: bytes `load` writes to the offload directory (same dtype: 0);
- cold: before every decode step the experts' bytes are dropped from the page cache (no
  expert cached: the worst case of experts that do not fit the page cache); the bytes read
  from disk per step (/proc/self/io read_bytes) vs the bytes of the experts the router
  picked, and tok/s vs the bound: those bytes / the measured cold read speed of
  expert-sized reads at random places in the files.

    python bench/moe.py                 # 5 warm runs of 16 tokens, 9 cold steps
    python bench/moe.py --runs 3 --cold-steps 5
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers as tf

import devicemap
from decode import Ranges, evict, offloaded, settle, warm_rates
from models import cache_root
from report import median, write

SHAPE = dict(
    hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, num_hidden_layers=12,
    num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_experts=64,
    num_experts_per_tok=4, vocab_size=32000, max_position_embeddings=2048, norm_topk_prob=True,
)  # fmt: skip
PINS = {"model.layers.*.mlp.experts": "disk"}


def moe_model() -> Path:
    """The saved random model (built once under the devicemap cache)."""
    path = cache_root() / "qwen3moe-1024x12x64-bf16"
    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    config = tf.Qwen3MoeConfig(**SHAPE, bos_token_id=1, eos_token_id=2)
    model = tf.Qwen3MoeForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    with torch.no_grad():  # std 1 embeddings: the router spreads tokens over the experts
        model.model.embed_tokens.weight.normal_(0, 1)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    model.save_pretrained(tmp, max_shard_size="500MB")
    tmp.rename(path)
    return path


def load_devicemap(path: Path, offload: Path) -> Any:
    return devicemap.load(
        path, max_memory={"cpu": "20GiB", "disk": "200GiB"}, pins=PINS, offload_exec="cpu",
        context=512, offload_dir=offload, progress=False,
    )  # fmt: skip


def written(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def sources(model: Any) -> list[Any]:
    from devicemap.run.experts import EXPERTS_ATTR

    return [m.__dict__[EXPERTS_ATTR] for m in model.modules() if EXPERTS_ATTR in m.__dict__]


def random_read_speed(ranges: Ranges, count: int = 64) -> float:
    """Cold read speed of expert-sized reads at random offsets of the expert tensors, bytes/s."""
    evict(ranges)
    spans = [(file, off, n) for file, spots in ranges.items() for off, n in spots]
    pick = random.Random(0).sample(spans, min(count * 3, len(spans)))
    total, start = 0, time.perf_counter()
    for file, offset, nbytes in pick:
        fd = os.open(file, os.O_RDONLY)
        try:
            total += len(os.pread(fd, nbytes, offset))
        finally:
            os.close(fd)
    return total / (time.perf_counter() - start)


def cold(model: Any, path: Path, steps: int) -> dict[str, Any]:
    device_map = model.devicemap_plan.device_map
    ranges, _ = offloaded(path, device_map)
    experts = sources(model)
    ids = torch.tensor([[1, 345, 678, 910]])
    reads, routed, times = [], [], []
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            settle(model)
            evict(ranges)
            before_read, before_routed = read_bytes(), sum(s.fetched for s in experts)
            start = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - start)
            reads.append(read_bytes() - before_read)
            routed.append(sum(s.fetched for s in experts) - before_routed)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    speed = random_read_speed(ranges)
    bound = speed / median(routed)  # tok/s if each step read exactly its routed experts
    return {
        "routed_MB": median(routed) / 1e6,
        "read_MB": median(reads) / 1e6,
        "read/routed": median(reads) / median(routed),
        "rand_read_MB_s": speed / 1e6,
        "cold_bound_tok_s": bound,
        "cold_dm_tok_s": 1 / median(times),
        "cold_dm/bound": (1 / median(times)) / bound,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16, help="decode steps per warm run")
    parser.add_argument("--runs", type=int, default=5, help="warm runs per engine (median)")
    parser.add_argument("--cold-steps", type=int, default=9, help="cold decode steps; 0 skips")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    path = moe_model()
    row: dict[str, Any] = {"model": "qwen3-moe 1024x12, 64 experts top-4, bf16"}
    with tempfile.TemporaryDirectory() as tmp:
        offload = Path(tmp) / "offload"
        dm = load_devicemap(path, offload)
        row["offload_written_B"] = written(offload) if offload.exists() else 0
        device_map = dict(dm.devicemap_plan.device_map)
        acc = tf.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16, device_map=device_map, offload_folder=str(Path(tmp) / "acc")
        ).eval()
        ram = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        row.update(warm_rates(ram, dm, acc, runs=args.runs, tokens=args.tokens))
        del acc, ram
        gc.collect()
        if args.cold_steps:
            row.update(cold(dm, path, args.cold_steps))
        devicemap.release(dm)
    write("moe", [row], notes={"command": "python bench/moe.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())})  # fmt: skip


if __name__ == "__main__":
    main()
