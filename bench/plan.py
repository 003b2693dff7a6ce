"""Planning Llama-3-70B from its config.json alone: devicemap vs accelerate, same budgets.

devicemap:  devicemap.plan(config dir, max_memory=..., context=8192)
            (build_skeleton on meta + make_plan, KV/workspace/logits counted)
accelerate: init_empty_weights + AutoModelForCausalLM.from_config (bf16) +
            infer_auto_device_map(max_memory=..., no_split_module_classes=...)
            (no KV cache or activations reserved)

Warm: both in this process, alternating, median of --runs each (imports and the first
call excluded). Cold: one fresh process per tool timing its imports and first call.
Target: devicemap at most as slow as accelerate, and under 0.3 s warm.

    python bench/plan.py             # 7 warm runs each + 1 cold process each
    python bench/plan.py --runs 11 --cold 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from report import median, write

CONFIG = Path(__file__).parent.parent / "tests" / "data" / "configs" / "llama-3-70b"
BUDGETS: dict[Any, str] = {0: "40GiB", 1: "40GiB", "cpu": "64GiB"}
CONTEXT = 8192


def plan_devicemap() -> dict[str, Any]:
    import devicemap

    return devicemap.plan(CONFIG, max_memory=BUDGETS, context=CONTEXT).device_map


def plan_accelerate() -> dict[str, Any]:
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(CONFIG)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return infer(model, BUDGETS, torch.bfloat16)


def infer(model: Any, budgets: dict[Any, str], dtype: Any) -> dict[str, Any]:
    """accelerate's infer_auto_device_map, quiet about the GPUs this machine lacks."""
    import logging
    import warnings

    from accelerate import infer_auto_device_map

    logging.getLogger("accelerate").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        device_map: dict[str, Any] = infer_auto_device_map(
            model, max_memory=budgets, no_split_module_classes=model._no_split_modules, dtype=dtype
        )
    return device_map


def planner_only() -> tuple[float, float]:
    """Seconds for the placement step alone: make_plan vs infer_auto_device_map (median of 5)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from devicemap.devices import resolve_budgets
    from devicemap.model.skeleton import build_skeleton
    from devicemap.plan.options import PlanOptions
    from devicemap.plan.planner import make_plan

    skeleton = build_skeleton(CONFIG)
    budgets, options = resolve_budgets(BUDGETS), PlanOptions(context=CONTEXT)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(CONFIG))
    ours, theirs = [], []
    for _ in range(5):
        ours.append(timed(lambda: make_plan(skeleton, budgets, options))[0])
        theirs.append(timed(lambda: infer(model, BUDGETS, torch.bfloat16))[0])
    return median(ours), median(theirs)


TOOLS = {"devicemap": plan_devicemap, "accelerate": plan_accelerate}


def timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def cold(tool: str) -> dict[str, float]:
    """In a fresh process: seconds to import the tool's modules, then for the first plan."""
    script = "; ".join(
        (
            "import json, sys, time",
            f"sys.path.insert(0, {str(Path(__file__).parent)!r})",
            "t = time.perf_counter()",
            f"import plan as b; b.import_modules({tool!r})",
            "i = time.perf_counter() - t",
            "t = time.perf_counter()",
            f"b.TOOLS[{tool!r}]()",
            "f = time.perf_counter() - t",
            "print(json.dumps({'imports': i, 'first_call': f}))",
        )
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def import_modules(tool: str) -> None:
    """What each tool needs imported before it can plan (timed separately from planning)."""
    import torch  # noqa: F401
    import transformers  # noqa: F401

    if tool == "devicemap":
        from devicemap.model import skeleton  # noqa: F401
    else:
        import accelerate  # noqa: F401
        from transformers import AutoModelForCausalLM  # noqa: F401


def summary(device_map: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for value in device_map.values():
        counts[str(value)] = counts.get(str(value), 0) + 1
    return ", ".join(f"{device}: {n}" for device, n in counts.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="warm runs per tool (median)")
    parser.add_argument("--cold", type=int, default=1, help="fresh processes per tool")
    args = parser.parse_args()

    colds = {tool: [cold(tool) for _ in range(args.cold)] for tool in TOOLS}
    for tool in TOOLS:
        import_modules(tool)
        TOOLS[tool]()  # first call, excluded from the warm numbers
    warm: dict[str, list[float]] = {tool: [] for tool in TOOLS}
    maps: dict[str, dict[str, Any]] = {}
    for _ in range(args.runs):  # alternate, so drift hits both alike
        for tool, fn in TOOLS.items():
            seconds, maps[tool] = timed(fn)
            warm[tool].append(seconds)
    ours, theirs = planner_only()

    rows = []
    for tool in TOOLS:
        rows.append(
            {
                "tool": tool,
                "warm_median_s": median(warm[tool]),
                "warm_min_s": min(warm[tool]),
                "placement_only_s": ours if tool == "devicemap" else theirs,
                "cold_imports_s": median([c["imports"] for c in colds[tool]]),
                "cold_first_call_s": median([c["first_call"] for c in colds[tool]]),
                "blocks_per_device": summary(maps[tool]),
            }
        )
    ratio = rows[0]["warm_median_s"] / rows[1]["warm_median_s"]
    cold_ratio = rows[0]["cold_first_call_s"] / rows[1]["cold_first_call_s"]
    rows.append({"tool": "ratio devicemap/accelerate", "warm_median_s": ratio})
    rows[-1]["cold_first_call_s"] = cold_ratio
    notes = {
        "model": "Llama-3-70B config.json only (bfloat16)",
        "budgets": {str(k): v for k, v in BUDGETS.items()},
        "context": CONTEXT,
        "warm": f"same process, alternating, median of {args.runs}; imports and first call"
        " excluded",
        "cold": f"{args.cold} fresh process(es) per tool: imports, then the first plan",
        "targets": "devicemap warm <= accelerate warm, and devicemap warm < 0.3 s",
        "met": bool(ratio <= 1.0 and rows[0]["warm_median_s"] < 0.3),
        "accelerate_reserves": "none: no KV cache, workspace or logits",
    }
    write("plan", rows, notes=notes)
    seconds = rows[0]["warm_median_s"]
    print(f"targets met: {notes['met']} (ratio {ratio:.2f}, devicemap {seconds:.3f} s)")


if __name__ == "__main__":
    main()
