"""One rank of a pipeline test, through the Python API: join the ranks, plan the model
over them (each rank's cpu budget exchanged), load this rank's stage, and write what it
holds and computes to OUT/rank<N>.json.

    python tests/pipeline_worker.py MODEL OUT [--mode generate|gpu|memory|agree]

(gpu: every rank's stage on cuda:0)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from devicemap.devices import CPU, parse_device
from devicemap.errors import RankMismatch
from devicemap.load.loader import load
from devicemap.model.skeleton import build_skeleton
from devicemap.plan.options import PlanOptions
from devicemap.plan.planner import RankBudgets
from devicemap.plan.stages import plan_ranks
from devicemap.run import ranks
from devicemap.run.pipeline import generate_micro_batches

PROMPT = [[1, 5, 9, 3, 7, 11, 4]]
MICRO = [[[8, 6, 7, 5, 3, 0, 9]], [[2, 7, 1, 8, 2, 8]]]
SEED = 1234


def outputs(model: Any) -> dict[str, Any]:
    """What a model computes for PROMPT, as JSON-ready lists: its logits, 8 greedy tokens,
    8 tokens sampled from SEED (a rank's stage here, plain transformers in the tests)."""
    ids = torch.tensor(PROMPT)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        greedy = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        torch.manual_seed(SEED)
        sampled = model.generate(
            ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=0, top_p=1.0
        )
    return {"logits": logits.cpu().tolist(), "greedy": greedy.tolist(), "sampled": sampled.tolist()}


def resident() -> int:
    """This process's resident memory, bytes (anonymous and file pages: CPU weights that are
    the checkpoint's own pages count once they are read in)."""
    import os

    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    model, out = Path(sys.argv[1]), Path(sys.argv[2])
    mode = sys.argv[4] if len(sys.argv) > 4 and sys.argv[3] == "--mode" else "generate"
    me = ranks.join()
    if mode == "agree":  # a different devicemap version on odd ranks
        try:
            ranks.agree({"devicemap version": f"0.{me.rank % 2}", "dtype": "float32"})
            result = {"error": None}
        except RankMismatch as error:
            result = {"error": str(error)}
        (out / f"rank{me.rank}.json").write_text(json.dumps(result))
        ranks.leave()
        return
    skeleton = build_skeleton(model)
    if mode == "memory":  # how much this rank's resident memory grows to load its stage
        budgets = ranks.gather(RankBudgets({CPU: 1 << 30}))
        plan = plan_ranks(skeleton, budgets, PlanOptions(context=128)).plans[me.rank]
        before = resident()
        loaded = load(skeleton, plan, progress=False)
        grown = resident() - before
        weights = sum(p.nbytes for p in loaded.parameters() if not p.is_meta)
        (out / f"rank{me.rank}.json").write_text(json.dumps({"grown": grown, "weights": weights}))
        ranks.leave()
        return
    mine = {parse_device(0): 1 << 30} if mode == "gpu" else {CPU: 64 << 20}  # gpu: cuda:0
    budgets = ranks.gather(RankBudgets(mine))
    stages = plan_ranks(skeleton, budgets, PlanOptions(context=128))
    plan = stages.plans[me.rank]
    loaded = load(skeleton, plan, progress=False)
    result = outputs(loaded)
    with torch.no_grad():
        # two micro-batches side by side (one lane each), each its own prompt
        micro = generate_micro_batches(
            loaded,
            [
                dict(input_ids=torch.tensor(p), attention_mask=torch.ones(1, len(p[0])))
                for p in MICRO
            ],
            max_new_tokens=8,
            do_sample=False,
        )
    result.update(
        rank=me.rank,
        micro=[m.tolist() for m in micro],
        loaded=list(plan.device_map),
        real=[n for n, p in loaded.named_parameters() if not p.is_meta],
        meta=[n for n, p in loaded.named_parameters() if p.is_meta],
        stages=stages.to_json()["stages"],
    )
    (out / f"rank{me.rank}.json").write_text(json.dumps(result))
    ranks.leave()


if __name__ == "__main__":
    main()
