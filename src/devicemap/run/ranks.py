"""This process among the ranks torchrun started, and the messages pipeline stages send.

torch.distributed does the transport: the process group is gloo (CPU tensors, TCP, also
the control messages), rendezvous from torchrun's environment (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT). Every operation here waits at most `timeout` seconds
(DEVICEMAP_RANK_TIMEOUT, default 300) and turns a peer that died (its connection closed:
at once) or hung (nothing arrives: after the timeout) into RankFailed naming that rank,
so no rank waits forever.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ..errors import BadOption, RankError, RankFailed, RankMismatch

TIMEOUT_ENV = "DEVICEMAP_RANK_TIMEOUT"
DEFAULT_TIMEOUT = 300.0  # seconds: a long prefill on a slow stage must fit in it
T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's rank among `size`, and how long any message may take."""

    rank: int
    size: int
    timeout: float  # seconds

    @property
    def last(self) -> int:
        return self.size - 1


_joined: Ranks | None = None
# bytes this rank has sent: hidden states to the next rank, logits it broadcast (benchmarks)
sent: dict[str, int] = {"hidden": 0, "logits": 0}


def world_size() -> int:
    """How many ranks torchrun started (1 when not launched by it)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise BadOption(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of ranks; launch with"
            " torchrun, which sets it"
        ) from None


def launched() -> bool:
    """Whether this process is one of several ranks (WORLD_SIZE > 1)."""
    return world_size() > 1


def rank_timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise BadOption(f"{TIMEOUT_ENV}={raw!r}: give a positive number of seconds")
    return value


def join() -> Ranks:
    """Join the process group torchrun's environment describes (once per process)."""
    global _joined
    if _joined is not None:
        return _joined
    import torch.distributed as dist

    timeout = rank_timeout()
    size = world_size()
    if not dist.is_initialized():
        try:
            dist.init_process_group(
                "gloo", timeout=datetime.timedelta(seconds=timeout), world_size=size
            )
        except (RuntimeError, ValueError, KeyError) as error:
            raise RankFailed(
                f"could not join the {size} ranks within {timeout:.0f} s: {_short(error)}."
                " Launch every rank with torchrun (same --nnodes, --nproc-per-node and"
                " --rdzv-endpoint on each machine) and check that each machine reaches the"
                " endpoint"
            ) from None
    _joined = Ranks(rank=dist.get_rank(), size=dist.get_world_size(), timeout=timeout)
    _store()  # connected now, while every rank is alive
    return _joined


def current() -> Ranks:
    """The ranks joined by `join` (RankFailed if this process never joined)."""
    if _joined is None:
        raise RankFailed("this process has not joined the ranks; call devicemap.run.ranks.join()")
    return _joined


def leave() -> None:
    """Leave the process group after a clean run, once every rank is done (a rank that
    exits first could take the rendezvous store, or data still in flight, with it); a
    failed run just exits."""
    global _joined
    import torch.distributed as dist

    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()
    _joined = None
    del _lanes[1:]  # their groups went with the process group


def barrier() -> None:
    """Until every rank gets here (RankFailed after the timeout)."""
    import torch.distributed as dist

    _guard(None, "finish", lambda: _wait(dist.barrier(async_op=True)))


def _short(error: BaseException) -> str:
    """The error's last line without gloo's source location and advice."""
    import re

    lines = str(error).strip().splitlines()
    text = re.sub(r"\[[^\]]*\.(cc|cpp|h):\d+\] ", "", lines[-1]) if lines else ""
    return text.split(". This is typically")[0][:300] or type(error).__name__


def _guard(peer: int | None, what: str, op: Callable[[], T]) -> T:
    ranks = current()
    try:
        return op()
    except RuntimeError as error:
        who = f"rank {peer}" if peer is not None else "another rank"
        cause = _first_failure(ranks, peer)
        raise RankFailed(
            f"rank {ranks.rank}: {who} did not {what} within {ranks.timeout:.0f} s, or closed"
            f" its connection ({_short(error)}){cause}: it died, hung or failed; see its"
            f" output. ({TIMEOUT_ENV} sets the timeout)"
        ) from None


_REPORT = "devicemap/failed/"  # + rank: the rank it lost (-1: unknown), in the rendezvous store
_REPORTS_S = 1.0  # seconds a failing rank waits for the others' reports


def _first_failure(ranks: Ranks, peer: int | None) -> str:
    """Where the failure began, from what every failing rank reports to the rendezvous store:
    rank 0 may lose rank 2, which lost rank 1 (killed): the rank others lost that reported
    nothing itself, else (no rank knows whom it lost) the ranks that reported nothing. ""
    when the store is gone too (it lives in rank 0 without torchrun)."""
    import time

    store = _store()
    if store is None:
        return ""
    try:
        store.set(f"{_REPORT}{ranks.rank}", str(-1 if peer is None else peer))
        time.sleep(_REPORTS_S)
        reports = {
            r: int(store.get(f"{_REPORT}{r}"))
            for r in range(ranks.size)
            if store.check([f"{_REPORT}{r}"])
        }
    except (RuntimeError, ValueError):
        return ""
    lost = sorted({b for b in reports.values() if b >= 0 and b not in reports})
    if not lost:  # no rank knows whom it lost (a broadcast's root): the ones that never said
        lost = [r for r in range(ranks.size) if r not in reports]
    if not lost or lost == [peer]:
        return ""
    chain = ", ".join(f"rank {r} lost rank {b}" for r, b in sorted(reports.items()) if b >= 0)
    began = ", ".join(map(str, lost))
    return f"; the failure began at rank {began} ({chain or 'the rank that reported nothing'})"


_client: Any = None


def _store() -> Any:
    """A client of the rendezvous store (torchrun's agent, or rank 0), or None."""
    global _client
    if _client is None:
        import torch.distributed as dist

        try:
            _client = dist.TCPStore(  # type: ignore[attr-defined]
                os.environ["MASTER_ADDR"],
                int(os.environ["MASTER_PORT"]),
                is_master=False,
                timeout=datetime.timedelta(seconds=5),
                wait_for_workers=False,
            )
        except (KeyError, ValueError, RuntimeError):
            return None
    return _client


# --- lanes: micro-batches side by side --------------------------------------------------

_lanes: list[Any] = [None]  # a process group per lane; lane 0 is the default group
_here = threading.local()  # .lane: the lane this thread's forwards use


def open_lanes(count: int) -> None:
    """At least `count` lanes, one process group each, so micro-batches running side by side
    (one thread each) never mix their messages. Every rank calls it with the same count."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=current().timeout)
    while len(_lanes) < count:
        group = _guard(None, "open a lane", lambda: dist.new_group(backend="gloo", timeout=timeout))
        _lanes.append(group)


@contextlib.contextmanager
def lane(index: int) -> Iterator[None]:
    """This thread's messages go through lane `index` (open_lanes first)."""
    if index >= len(_lanes):
        raise RankError(f"lane {index} is not open; call open_lanes({index + 1}) on every rank")
    before = getattr(_here, "lane", 0)
    _here.lane = index
    try:
        yield
    finally:
        _here.lane = before


def _group() -> Any:
    return _lanes[getattr(_here, "lane", 0)]


def _wait(work: Any) -> None:
    work.wait(datetime.timedelta(seconds=current().timeout))


def send(tensor: torch.Tensor, to: int) -> None:
    """Send `tensor` (copied to the CPU for gloo) to rank `to`."""
    import torch.distributed as dist

    data = tensor.detach().to("cpu").contiguous()
    _guard(to, "receive the hidden states", lambda: _wait(dist.isend(data, to, group=_group())))
    sent["hidden"] += data.nbytes


def recv(like: torch.Tensor, source: int) -> torch.Tensor:
    """A tensor shaped and typed as `like` (a meta tensor will do), from rank `source`."""
    import torch.distributed as dist

    out = torch.empty(like.shape, dtype=like.dtype)
    _guard(source, "send the hidden states", lambda: _wait(dist.irecv(out, source, group=_group())))
    return out


def broadcast(tensor: torch.Tensor, source: int) -> torch.Tensor:
    """`tensor` from rank `source` on every rank (pass a meta tensor where it is not known)."""
    import torch.distributed as dist

    root = current().rank == source
    if root:
        data = tensor.detach().to("cpu").contiguous()
        sent["logits"] += data.nbytes * (current().size - 1)
    else:
        data = torch.empty(tensor.shape, dtype=tensor.dtype)
    work = lambda: _wait(dist.broadcast(data, source, group=_group(), async_op=True))  # noqa: E731
    if root:  # which receiver is gone, gloo does not say: the reports in the store may
        _guard(None, "receive the logits", work)
    else:
        _guard(source, "send the logits", work)
    return data


def gather(value: Any) -> list[Any]:
    """Every rank's `value` (picklable), in rank order, on every rank."""
    import torch.distributed as dist

    ranks = current()
    out: list[Any] = [None] * ranks.size
    _guard(None, "start up", lambda: dist.all_gather_object(out, value))
    return out


def share(value: Any, source: int = 0, *, timeout: float | None = None) -> Any:
    """Rank `source`'s `value` (picklable) on every rank; `timeout` (seconds) replaces the
    ranks' own for this wait (a chat waits on its user as long as it takes)."""
    import pickle

    import torch.distributed as dist

    ranks = current()
    wait = datetime.timedelta(seconds=timeout or ranks.timeout)
    mine = ranks.rank == source
    data = pickle.dumps(value) if mine else b""
    size = torch.tensor([len(data)], dtype=torch.int64)

    def step(tensor: torch.Tensor) -> None:
        dist.broadcast(tensor, source, async_op=True).wait(wait)

    _guard(source, "share its input", lambda: step(size))
    payload = (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if mine
        else torch.empty(int(size.item()), dtype=torch.uint8)
    )
    _guard(source, "share its input", lambda: step(payload))
    return value if mine else pickle.loads(payload.numpy().tobytes())


def agree(fields: Mapping[str, str]) -> None:
    """RankMismatch on every rank unless all ranks started with the same `fields` (versions,
    checkpoint, options): each difference named, with both values."""
    every = gather(dict(fields))
    base = every[0]
    wrong = [
        f"rank {r} has {key} {theirs.get(key)!r} where rank 0 has {base.get(key)!r}"
        for r, theirs in enumerate(every[1:], 1)
        for key in sorted(set(base) | set(theirs))
        if base.get(key) != theirs.get(key)
    ]
    if wrong:
        barrier()  # every rank has every rank's fields: all of them say so, then exit
        raise RankMismatch(
            "the ranks did not start alike: " + "; ".join(wrong) + ". Start every rank with"
            " the same devicemap, torch and transformers versions, the same model files and"
            " the same options (only --max-memory, --gpus and the GPU margins may differ)"
        )
