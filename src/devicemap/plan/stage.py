"""One rank's part of a pipeline plan (Plan.stage): which blocks other ranks hold, and what
this rank does at each of them (see plan/stages.py, which makes it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import PlanError

Role = Literal["skip", "zeros", "meta", "logits"]
ROLES: tuple[Role, ...] = ("skip", "zeros", "meta", "logits")


@dataclass(frozen=True)
class Stage:
    """One rank's part of a pipeline plan (Plan.stage)."""

    rank: int
    ranks: int
    holders: Mapping[str, int]  # every block -> the rank that stores it (where it is loaded)
    remote: Mapping[str, Role]  # module -> what it does here, for blocks other ranks hold
    entry: str | None  # the layer whose input hidden states arrive from rank - 1
    exit: str | None  # the layer whose output hidden states go to rank + 1
    head: str | None  # the LM head (broadcasts its logits from the last rank)
    hidden_bytes: int  # per token per sequence, sent to the next rank
    logits_bytes: int  # per sequence per step, the LM head's output broadcast to every rank

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "ranks": self.ranks,
            "holders": dict(self.holders),
            "remote": dict(self.remote),
            "entry": self.entry,
            "exit": self.exit,
            "head": self.head,
            "hidden_bytes": self.hidden_bytes,
            "logits_bytes": self.logits_bytes,
        }


def stage_from_json(data: Any, where: str) -> Stage:
    """The Stage of a saved plan; PlanError naming the field that is wrong."""

    def bad(what: str) -> PlanError:
        return PlanError(f"{where}: stage.{what} is not valid; make the plan again")

    if not isinstance(data, dict):
        raise bad("(the whole entry)")
    ints = {k: data.get(k) for k in ("rank", "ranks", "hidden_bytes", "logits_bytes")}
    for key, value in ints.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise bad(key)
    holders, remote = data.get("holders"), data.get("remote")
    if not isinstance(holders, dict) or not all(
        isinstance(v, int) and 0 <= v < int(data["ranks"]) for v in holders.values()
    ):
        raise bad("holders")
    if not isinstance(remote, dict) or not all(v in ROLES for v in remote.values()):
        raise bad("remote")
    names = {k: data.get(k) for k in ("entry", "exit", "head")}
    for key, value in names.items():
        if value is not None and not isinstance(value, str):
            raise bad(key)
    return Stage(holders=holders, remote=remote, **ints, **names)  # type: ignore[arg-type]
