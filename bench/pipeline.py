"""Pipeline stages on one machine: decode tok/s of 1 vs 2 vs 3 ranks (the cost of the
hops), bytes sent per token, the latency of one hop, and micro-batches.

Every rank is a process on this machine talking gloo over 127.0.0.1 (the environment
torchrun sets: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); each gets cores / ranks torch
threads (at least 1), so 1, 2 and 3 ranks use the same cores. The model is a random llama
of a real shape (bench/models.py, smollm: 30 layers, hidden 576, vocab 49152, fp32), all
in RAM on every rank (cpu budgets large enough), planned by devicemap over the ranks.

Measured per rank count, medians over `--runs`:

- `tok_s`: greedy decode of `--tokens` tokens, batch 1 (one generate; prefill excluded);
  `/1rank` the ratio to one process. At batch 1 the stages take turns (one core busy at a
  time), so the first row is one process on one thread, and `added_ms_tok` what the ranks
  add per token over it: the hops, and each rank's pass over the other stages' stand-ins.
- `sent_B_tok`: bytes every rank sent per generated token (hidden states to the next
  rank, the logits the last rank broadcasts), from devicemap's own counters.
- `hop_ms`: one hop alone, rank 0 -> rank 1 -> rank 0 of a [1, 1, hidden] tensor, half
  the round trip (median of 200).
- micro-batches, `--micro M` prompts: `batchM_tok_s` one generate over the M prompts
  together (lockstep: one stage busy at a time), `microM_tok_s` the M prompts as M
  micro-batches side by side (devicemap.run.pipeline.generate_micro_batches: one lane
  each, so the stages work at once), aggregate tokens/s; `micro/batch` their ratio.
- `memory_by_rank`: per rank, the resident memory its load added (`load_MB`,
  /proc/self/statm) and the weights it holds (`weights_MB`): each rank's share, not the model.

    python bench/pipeline.py                       # 1, 2, 3 ranks, 32 tokens, 3 runs
    python bench/pipeline.py --ranks 1,2 --tokens 8 --runs 1      # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import report
from models import bench_model

PROMPT = 24  # tokens per prompt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm")
    ap.add_argument("--ranks", default="1,2,3")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        worker(args)
        return
    import torch

    model = bench_model(args.model, torch.float32)
    rows = []
    sizes = [int(n) for n in args.ranks.split(",")]
    for size, threads in [(1, 1), *((n, None) for n in sizes)]:  # first: 1 rank, 1 thread
        with tempfile.TemporaryDirectory() as out:
            result = launch(size, model, args, Path(out), threads=threads)
        rows.append(result)
        print(json.dumps(result), flush=True)
    one_thread = rows[0]["ms_tok"]
    base = next(r["tok_s"] for r in rows[1:] if r["ranks"] == 1) if 1 in sizes else None
    for row in rows:
        row["/1rank"] = row["tok_s"] / base if base else None
        # at batch 1 one stage works at a time, on one thread: what the ranks add per token
        row["added_ms_tok"] = row["ms_tok"] - one_thread if row["threads_per_rank"] == 1 else None
    path = report.write("pipeline", rows, notes={"model": args.model, "tokens": args.tokens})
    print(f"wrote {path}")


def launch(
    size: int, model: Path, args: argparse.Namespace, out: Path, *, threads: int | None = None
) -> dict[str, Any]:
    """Run `size` ranks of the worker to the end (`threads` each, default cores / size);
    rank 0's results."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = threads or max(1, (os.cpu_count() or 1) // size)
    procs = []
    for rank in range(size):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DEVICEMAP_RANK_TIMEOUT": "600"}
        if size > 1:
            env.update(
                RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size),
                LOCAL_WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
            )  # fmt: skip
        argv = [sys.executable, __file__, "--worker", str(out), "--model", str(model)]
        argv += ["--tokens", str(args.tokens), "--runs", str(args.runs), "--micro", str(args.micro)]
        procs.append(subprocess.Popen(argv, env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a rank failed: exit codes {codes}")
    result: dict[str, Any] = json.loads((out / "result.json").read_text())
    return result


def worker(args: argparse.Namespace) -> None:
    import torch

    from devicemap.devices import CPU
    from devicemap.load.loader import load
    from devicemap.model.skeleton import build_skeleton
    from devicemap.plan.options import PlanOptions
    from devicemap.plan.planner import RankBudgets, make_plan
    from devicemap.plan.stages import plan_ranks
    from devicemap.run import ranks
    from devicemap.run.pipeline import generate_micro_batches

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    launched = ranks.launched()
    me = ranks.join() if launched else None
    skeleton = build_skeleton(args.model)
    options = PlanOptions(context=PROMPT + args.tokens + 8, batch=args.micro)
    if me is not None:
        every = ranks.gather(RankBudgets({CPU: 16 << 30}))
        plan = plan_ranks(skeleton, every, options).plans[me.rank]
    else:
        plan = make_plan(skeleton, {CPU: 16 << 30}, options)
    before = resident()
    model = load(skeleton, plan, progress=False)
    memory = {
        "load_MB": (resident() - before) / 1e6,  # resident memory the load added
        "weights_MB": sum(p.nbytes for p in model.parameters() if not p.is_meta) / 1e6,
    }
    torch.manual_seed(0)
    vocab = skeleton.config.vocab_size
    prompts = torch.randint(3, vocab, (args.micro, PROMPT))  # the same on every rank
    greedy = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    def decode_s(ids: torch.Tensor, tokens: int) -> float:
        mask = torch.ones_like(ids)
        start = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, **greedy)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(
            ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens, **greedy
        )
        return time.perf_counter() - start - prefill

    def micro_s(tokens: int) -> float:
        batches = [
            dict(input_ids=p[None], attention_mask=torch.ones(1, PROMPT, dtype=torch.long))
            for p in prompts
        ]
        start = time.perf_counter()
        generate_micro_batches(
            model, batches, max_new_tokens=tokens, min_new_tokens=tokens, **greedy
        )
        return time.perf_counter() - start

    with torch.no_grad():
        decode_s(prompts[:1], 4)  # warm up
        micro_s(2)
        sent_before = dict(ranks.sent)
        one = [args.tokens / decode_s(prompts[:1], args.tokens) for _ in range(args.runs)]
        sent = {k: (ranks.sent[k] - sent_before[k]) / (args.tokens * args.runs) for k in ranks.sent}
        batch = [
            args.micro * args.tokens / decode_s(prompts, args.tokens) for _ in range(args.runs)
        ]
        micro = [args.micro * args.tokens / micro_s(args.tokens) for _ in range(args.runs)]
    hop = hop_ms(skeleton.config.hidden_size) if me is not None else 0.0
    row = {
        "ranks": me.size if me else 1,
        "tok_s": statistics.median(one),
        "ms_tok": 1000 / statistics.median(one),
        "sent_B_tok": sent,
        "hop_ms": hop,
        f"batch{args.micro}_tok_s": statistics.median(batch),
        f"micro{args.micro}_tok_s": statistics.median(micro),
        "micro/batch": statistics.median(micro) / statistics.median(batch),
        "threads_per_rank": torch.get_num_threads(),
    }
    if me is not None:
        every_sent = ranks.gather(sent)
        row["sent_B_tok"] = sum(sum(s.values()) for s in every_sent)
        row["sent_by_rank"] = every_sent
        row["memory_by_rank"] = ranks.gather(memory)
    else:
        row["sent_B_tok"] = 0
        row["memory_by_rank"] = [memory]
    if me is None or me.rank == 0:
        (Path(args.worker) / "result.json").write_text(json.dumps(row))
    if me is not None:
        ranks.leave()


def resident() -> int:
    """This process's resident memory in bytes (weights that are the checkpoint's own pages
    count once read in)."""
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hop_ms(hidden: int, rounds: int = 200) -> float:
    """Half the median round trip rank 0 -> 1 -> 0 of one token's hidden states."""
    import torch

    from devicemap.run import ranks

    me = ranks.current()
    x = torch.zeros(1, 1, hidden)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        if me.rank == 0:
            ranks.send(x, 1)
            ranks.recv(x, 1)
        elif me.rank == 1:
            x = ranks.recv(x, 0)
            ranks.send(x, 0)
        times.append(time.perf_counter() - start)
    ranks.barrier()
    return statistics.median(times) * 1000 / 2


if __name__ == "__main__":
    main()
