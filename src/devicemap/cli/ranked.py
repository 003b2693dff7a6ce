"""Commands over several ranks.

Under torchrun (WORLD_SIZE > 1) `plan`, `run` and `chat` plan one model over every rank:
each rank measures its own budgets (its own --max-memory, or what is free on its
machine), the ranks check that they started alike and exchange their budgets, every rank
computes the same Stages and loads only its own stage; rank 0 reads the prompt and
prints the reply. `devicemap plan --ranks N` or `--rank-budgets FILE` plans for ranks you
do not have.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BadOption
from .options import PlanChoices, read_json_option

if TYPE_CHECKING:
    from ..devices import Device
    from ..model.checkpoint import ModelSource
    from ..model.skeleton import Skeleton
    from ..plan.planner import RankBudgets
    from ..plan.stages import Stages
    from ..run.generate import Sampling
    from ..run.ranks import Ranks

_EDGE = 1 << 20  # bytes hashed at each end of each weights file: other weights differ there
# options that may differ between ranks: each machine has its own devices
PER_MACHINE = ("max_memory", "gpus", "gpu_memory_fraction", "gpu_margin", "page_cache")


def joined() -> Ranks | None:
    """This process's Ranks when torchrun started several, else None (one process)."""
    from ..run import ranks

    return ranks.join() if ranks.launched() else None


def identity(skeleton: Skeleton, planning: PlanChoices, command: str) -> dict[str, str]:
    """What must be the same on every rank: versions, the model's config and weights
    files (names, shapes, dtypes, and a hash of each file's size and first and last MiB),
    the command and the planning options that are not per machine."""
    from importlib import metadata

    import torch

    from ..model.checkpoint import read_index
    from .version import version

    index = read_index(skeleton.source)
    layout = sorted((n, str(t.dtype), list(t.shape), t.offset) for n, t in index.tensors.items())
    weights = hashlib.sha256(json.dumps(layout).encode())
    for file in sorted({t.file for t in index.tensors.values()}, key=lambda f: f.name):
        weights.update(_file_digest(file).encode())
    options = {k: v for k, v in vars(planning).items() if k not in PER_MACHINE}
    return {
        "devicemap version": version(),
        "torch version": torch.__version__,
        "transformers version": metadata.version("transformers"),
        "command": command,
        "model config": skeleton.fingerprint[:16],
        "dtype": str(skeleton.dtype),
        "weights": weights.hexdigest()[:16],
        "options": json.dumps(options, sort_keys=True, default=str),
    }


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        size = file.seek(0, 2)
        digest.update(str(size).encode())
        for start in (0, max(0, size - _EDGE)):
            file.seek(start)
            digest.update(file.read(_EDGE))
    return digest.hexdigest()


def read_rank_budgets(path: str) -> list[RankBudgets]:
    """--rank-budgets FILE: a JSON list with one {device: size} object per rank."""
    from ..devices import measure_budgets
    from ..errors import DevicemapError
    from ..plan.planner import RankBudgets

    def bad(why: str) -> BadOption:
        return BadOption(
            f"--rank-budgets {path}: {why}; give a JSON list with one object of budgets per"
            ' rank, like [{"0": "24GiB", "cpu": "64GiB"}, {"cpu": "128GiB", "disk": "1TB"}]',
            options=("rank_budgets",),
        )

    data = read_json_option(path, bad)
    if not isinstance(data, list) or not data or not all(isinstance(r, dict) for r in data):
        raise bad("not a non-empty list of objects")
    out = []
    for r, budgets in enumerate(data):
        try:
            measured = measure_budgets({str(k): v for k, v in budgets.items()})
        except DevicemapError as error:
            raise bad(f"rank {r}: {error}") from None
        out.append(RankBudgets(measured.sizes, None, measured.notes))
    return out


def plan_stages(
    planning: PlanChoices,
    model: str | Skeleton,
    *,
    ranks: Ranks | None = None,
    what_if: int | None = None,
    budgets_file: str | None = None,
    context: int | None = None,
    images: int | None = None,
) -> Stages:
    """One plan over the joined `ranks` (their budgets exchanged), or over `what_if` ranks
    with this command's budgets each, or over the ranks of `budgets_file`."""
    from ..plan.stages import plan_ranks
    from ..run import ranks as rank_ops

    skeleton, here, options = planning.inputs(model, context=context, images=images)
    every: Sequence[RankBudgets]
    if ranks is not None:
        every = rank_ops.gather(machine_share(here, named(planning), ranks.rank))
    elif budgets_file is not None:
        every = read_rank_budgets(budgets_file)
    else:
        every = [here] * (what_if or 1)
    return plan_ranks(skeleton, every, options)


def named(planning: PlanChoices) -> set[Device]:
    """The devices --max-memory gives a size (not a percentage of what is free)."""
    from ..devices import parse_device
    from .options import parse_max_memory

    given = parse_max_memory(planning.max_memory) or {}
    return {parse_device(d) for d, size in given.items() if not str(size).strip().endswith("%")}


def machine_share(here: RankBudgets, given: set[Device], rank: int) -> RankBudgets:
    """This rank's part of a machine that torchrun runs several ranks on (LOCAL_WORLD_SIZE):
    what was measured free is shared, not counted by each: the GPUs dealt out by local rank
    (a GPU with several ranks on it split between them), RAM and disk divided evenly. Sizes
    --max-memory gives are the rank's own, as given."""
    import dataclasses

    from ..devices import format_size

    size = _env_int("LOCAL_WORLD_SIZE", 1)
    local = _env_int("LOCAL_RANK", 0)
    if size <= 1:
        return here
    gpus = [d for d in here.sizes if d.is_gpu and d not in given]
    sizes: dict[Device, int] = {}
    for device, budget in here.sizes.items():
        if device in given:
            sizes[device] = budget
        elif device.is_gpu:
            slot = gpus.index(device)
            if len(gpus) >= size:  # GPUs dealt out: slot i to local rank i % size
                sharing = [slot % size]
            else:  # fewer GPUs than ranks: local rank r on GPU r % GPUs, shared
                sharing = [r for r in range(size) if r % len(gpus) == slot]
            if local in sharing:
                sizes[device] = budget // len(sharing)
        else:
            sizes[device] = budget // size
    shared = ", ".join(f"{d} {format_size(n)}" for d, n in sizes.items() if d not in given)
    note = (
        f"rank {rank} is local rank {local} of {size} on its machine: its share of what is"
        f" free there: {shared or 'nothing measured'} (--max-memory gives a rank its own)"
    )
    free_ram = None if here.free_ram is None else here.free_ram // size
    return dataclasses.replace(here, sizes=sizes, free_ram=free_ram, notes=(*here.notes, note))


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def plan_together(
    planning: PlanChoices,
    source: ModelSource,
    ranks: Ranks,
    command: str,
    *,
    context: int | None = None,
    images: int | None = None,
) -> tuple[Skeleton, Stages]:
    """The skeleton and the plan over every joined rank, once they have agreed that they
    started alike (RankMismatch on every rank otherwise)."""
    from ..model.skeleton import build_skeleton
    from ..run.ranks import agree

    trust = planning.trust_remote_code
    skeleton = build_skeleton(source, dtype=planning.dtype, trust_remote_code=trust)
    agree(identity(skeleton, planning, command))
    if context is not None and skeleton.max_positions is not None:
        context = min(context, skeleton.max_positions)
    stages = plan_stages(planning, skeleton, ranks=ranks, context=context, images=images)
    return skeleton, stages


def check_ranks_option(ranks: Ranks | None, what_if: int | None, budgets_file: str | None) -> None:
    """--ranks and --rank-budgets are what-ifs: BadOption when they contradict torchrun's ranks."""
    if what_if is not None and what_if < 1:
        raise BadOption(f"--ranks {what_if}: give 1 or more ranks", options=("ranks",))
    if what_if is not None and budgets_file is not None:
        raise BadOption(
            "give --ranks N (the same budgets on every rank) or --rank-budgets FILE (each"
            " rank's own), not both",
            options=("ranks", "rank_budgets"),
        )
    if ranks is None:
        return
    if budgets_file is not None or (what_if is not None and what_if != ranks.size):
        raise BadOption(
            f"torchrun started {ranks.size} ranks, which plan with their own budgets:"
            " drop --ranks / --rank-budgets (they plan for ranks you do not have)",
            options=("ranks", "rank_budgets"),
        )


def stage_json(stages: Stages, rank: int) -> dict[str, Any]:
    """What rank `rank` prints with --json: its own blocks and plan; rank 0 every rank's."""
    plan = stages.plans[rank]
    assert plan.stage is not None
    out: dict[str, Any] = {
        "rank": rank,
        "ranks": stages.ranks,
        "blocks": list(plan.device_map),  # what it loads: its stage, and tied partners
        "plan": plan.to_json(),
    }
    if rank == 0:
        out["stages"] = stages.to_json()["stages"]
        out["explain"] = list(stages.lines)
    return out


def shared_input(ranks: Ranks, value: Any) -> Any:
    """Rank 0's prompt (token ids, image inputs, sampling) on every rank."""
    from ..run import ranks as rank_ops

    return rank_ops.share(value if ranks.rank == 0 else None, 0)


def seeded(sampling: Sampling) -> Sampling:
    """Sampling that every rank repeats: a seed drawn here when sampling has none (rank 0
    shares it), so all ranks pick the same tokens."""
    import dataclasses

    if sampling.greedy or sampling.seed is not None:
        return sampling
    return dataclasses.replace(sampling, seed=random.randrange(2**63))
