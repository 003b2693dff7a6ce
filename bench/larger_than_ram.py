"""A model larger than RAM: devicemap's disk-tier cache policy vs transformers + accelerate.

A random llama of a 13B shape in bf16 (hidden 5120, 40 layers: 26 GB), written shard by
shard (never whole in RAM), planned with `cpu=10GiB` and the rest on disk, CPU execution.
devicemap keeps as many disk blocks resident in the page cache as the machine's free RAM
allows and streams the others through it; transformers + accelerate runs on the same
device map. Each engine decodes in a process of its own; reported per engine: s/token
(median), GB read from disk per token (/proc/self/io read_bytes), anonymous memory
(RssAnon), and for devicemap the bound: the streamed bytes per token / the cold
sequential read speed of those bytes in file order with the same reader
(MADV_POPULATE_READ of each streamed block in turn).

    python bench/larger_than_ram.py                       # 13B shape, this machine's RAM
    python bench/larger_than_ram.py --scale 0.25 --cgroup-mib 1200   # ~2 GB in a 1.2 GB cgroup

`--cgroup-mib` runs both engines inside a memory-limited cgroup (root, cgroup v1), the
small-scale check of the same behaviour in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from safetensors.torch import save_file

from models import cache_root
from report import median, write

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from cgroup import memory_cgroup, run_in, why_not

SHAPE_13B = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                 num_attention_heads=40, num_key_value_heads=40, vocab_size=32000)  # fmt: skip
SHARD = 2 << 30  # bytes per shard, as the hub's 13B checkpoints


def shape(scale: float) -> dict[str, int]:
    """The 13B shape with its widths scaled (heads of 128), layers kept."""
    hidden = max(128, int(SHAPE_13B["hidden_size"] * scale) // 128 * 128)
    heads = hidden // 128
    inter = max(256, int(SHAPE_13B["intermediate_size"] * scale) // 256 * 256)
    return {**SHAPE_13B, "hidden_size": hidden, "intermediate_size": inter,
            "num_attention_heads": heads, "num_key_value_heads": heads}  # fmt: skip


def build(scale: float) -> Path:
    """The saved random model, written tensor by tensor into 2 GB shards (built once)."""
    dims = shape(scale)
    path = cache_root() / f"llama-ltr-{dims['hidden_size']}x{dims['num_hidden_layers']}-bf16"
    if (path / "model.safetensors.index.json").exists():
        return path
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    config = tf.LlamaConfig(**dims, max_position_embeddings=2048, bos_token_id=1,
                            eos_token_id=2, dtype="bfloat16",
                            architectures=["LlamaForCausalLM"])  # fmt: skip
    config.save_pretrained(tmp)
    with torch.device("meta"):
        names = {k: v.shape for k, v in tf.LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    shards: list[dict[str, Any]] = [{}]
    size = 0
    for name, dims_ in names.items():
        nbytes = dims_.numel() * 2
        if size + nbytes > SHARD and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = dims_
        size += nbytes
    weight_map = {}
    for i, members in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, dims_ in members.items():
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(dims_, dtype=torch.bfloat16)
            else:
                t = torch.empty(dims_, dtype=torch.bfloat16)
                tensors[name] = t.normal_(0, 0.02, generator=generator)
            weight_map[name] = file
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        del tensors
    total = sum(v.numel() * 2 for v in names.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    tmp.rename(path)
    return path


_CHILD = textwrap.dedent(
    """
    import json, sys, time, tempfile
    from pathlib import Path
    import torch

    engine, path, cpu, tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

    def read_bytes():
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])

    def anon():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

    torch.set_num_threads(torch.get_num_threads())
    import devicemap
    plan = devicemap.plan(path, max_memory={"cpu": cpu, "disk": "1TiB"}, offload_exec="cpu",
                          context=64)
    start = time.perf_counter()
    if engine == "devicemap":
        model = devicemap.load(path, plan=plan, progress=False)
    else:
        import transformers as tf
        offload = tempfile.mkdtemp(prefix="acc-", dir=Path(path).parent)
        model = tf.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16, device_map=dict(plan.device_map),
            offload_folder=offload)
    load_s = time.perf_counter() - start
    ids = torch.tensor([[1, 345, 678, 910]])
    times, reads = [], []
    with torch.no_grad():
        out = model(ids, use_cache=True)
        for step in range(tokens + 1):  # the first step warms the resident set
            token = out.logits[:, -1:].argmax(-1)
            before, t0 = read_bytes(), time.perf_counter()
            out = model(token, past_key_values=out.past_key_values, use_cache=True)
            if step:
                times.append(time.perf_counter() - t0)
                reads.append(read_bytes() - before)
    row = {"load_s": load_s, "times": times, "reads": reads, "anon": anon(),
           "page_cache": plan.options.page_cache, "streamed": len(plan.streamed),
           "disk_blocks": sum(1 for v in plan.device_map.values() if v == "disk")}
    if engine == "devicemap":
        from devicemap.run.dispatch import _STATE
        from devicemap.run.pages import drop, fault_in
        prefetcher = next(o for o in model.__dict__[_STATE].offloads if hasattr(o, "dropped"))
        blocks = [n for n in plan.device_map if n in plan.streamed]
        for name in blocks:  # cold
            drop(prefetcher._pages[name], prefetcher._files[name])
        t0 = time.perf_counter()
        for name in blocks:  # in execution order = file order for these checkpoints
            fault_in(prefetcher._pages[name])
        took = time.perf_counter() - t0
        streamed = sum(sum(n for _, n in prefetcher._pages[b].spans) for b in blocks)
        row.update({"streamed_bytes": streamed, "seq_read_s": took})
    if engine != "devicemap":
        import shutil
        shutil.rmtree(offload, ignore_errors=True)
    print(json.dumps(row))
    """
)


def run(engine: str, path: Path, cpu: str, tokens: int, cgroup: int | None) -> dict[str, Any]:
    args = [engine, str(path), cpu, str(tokens)]
    if cgroup is None:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, check=False,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")},
        )  # fmt: skip
    else:
        with memory_cgroup(cgroup) as group:
            done = run_in(group, _CHILD, args, timeout=3600)
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def evict(path: Path) -> None:
    """Start each engine cold: nothing of the model in the page cache."""
    for file in path.glob("*.safetensors"):
        fd = os.open(file, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="widths x this (1: 13B)")
    parser.add_argument("--cpu", default="10GiB", help="the cpu budget (default 10GiB)")
    parser.add_argument("--tokens", type=int, default=3, help="decode steps measured")
    parser.add_argument("--cgroup-mib", type=int, default=None, help="run in a cgroup of this")
    parser.add_argument("--skip-accelerate", action="store_true")
    args = parser.parse_args()
    if args.cgroup_mib is not None and why_not() is not None:
        sys.exit(f"--cgroup-mib: {why_not()}")
    cgroup = None if args.cgroup_mib is None else args.cgroup_mib << 20
    path = build(args.scale)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    rows = []
    for engine in ("devicemap", *(() if args.skip_accelerate else ("accelerate",))):
        evict(path)
        start = time.perf_counter()
        result = run(engine, path, args.cpu, args.tokens, cgroup)
        wall = time.perf_counter() - start
        row: dict[str, Any] = {"engine": engine, "model_GB": size / 1e9, "wall_s": wall}
        if "error" in result:
            row["error"] = result["error"]
        else:
            row.update({
                "s_per_token": median(result["times"]),
                "GB_read_per_token": median(result["reads"]) / 1e9,
                "anon_GB": result["anon"] / 1e9,
                "disk_blocks": result["disk_blocks"],
                "streamed": result["streamed"],
                "page_cache_GB": (result["page_cache"] or 0) / 1e9,
                "load_s": result["load_s"],
            })  # fmt: skip
            if "seq_read_s" in result:
                row["streamed_GB"] = result["streamed_bytes"] / 1e9
                row["bound_s_per_token"] = result["seq_read_s"]
                row["bound/actual"] = result["seq_read_s"] / row["s_per_token"]
        rows.append(row)
    if len(rows) == 2 and "s_per_token" in rows[0] and "s_per_token" in rows[1]:
        rows[0]["dm_vs_acc"] = rows[1]["s_per_token"] / rows[0]["s_per_token"]
    flags = f"--scale {args.scale} --cpu {args.cpu} --tokens {args.tokens}"
    flags += f" --cgroup-mib {args.cgroup_mib}" if args.cgroup_mib else ""
    name = "larger_than_ram" + ("_cgroup" if args.cgroup_mib else "")
    write(name, rows, notes={"command": f"python bench/larger_than_ram.py {flags}"})


if __name__ == "__main__":
    main()
