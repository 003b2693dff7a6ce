"""Continuous batching on a loaded model: every active request advances by one token per
step, all of them in one forward, so an offloaded model reads its streamed weights once per
step whatever the number of requests.

Requests wait in a bounded queue; between decode steps the waiting ones (up to the free
rows) are prefilled together, left-padded to a common length, and join the batch; a
finished or cancelled request leaves it at once. The batch keeps one KV cache (transformers'
DynamicCache, each layer's tensors on the device that layer runs on, as the plan budgets
them): rows are aligned at their right end, each with its own left padding, masked out, and
its own positions; padding every row shares is cut off when rows leave.

Why not transformers' continuous-batching manager (`generate_batch`, a paged cache): it
keeps every layer's cache in one tensor on one device and sizes it from that device's free
memory, where a devicemap plan puts each layer's KV on the GPU that layer runs on and has
already budgeted it (--max-batch x --context).

Models whose cache is not plain full-attention layers (sliding windows, recurrent state,
encoder-decoders) cannot share padded rows; their requests still advance together, step by
step, but with one forward per request.
"""

from __future__ import annotations

import dataclasses
import inspect
import random
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..errors import DevicemapError, GenerationFailed, RankFailed
from ..run.generate import (
    Sampling,
    TextDecoder,
    check_vocabulary,
    eos_ids,
    input_device,
    to_device,
)
from ..run.ranks import Ranks, share

Finish = Literal["stop", "length", "abort"]


class QueueFull(DevicemapError):
    """Every row is busy and the waiting queue is full."""


class EngineClosed(DevicemapError):
    """The engine is shutting down and takes no more requests."""


@dataclass(frozen=True)
class Event:
    """What the engine tells a request's owner: new text, the end, or a failure."""

    kind: Literal["text", "end", "error"]
    text: str = ""
    finish_reason: Finish | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: BaseException | None = None


@dataclass(eq=False)
class Job:
    """One request: its prompt and options, and where its events go (`emit` is called on
    the engine's thread; it must not block)."""

    prompt_ids: Sequence[int]
    sampling: Sampling
    emit: Callable[[Event], None]
    stop: tuple[str, ...] = ()
    inputs: Mapping[str, Any] | None = None  # a processor's pixel_values and friends
    cancelled: threading.Event = field(default_factory=threading.Event)
    # state, the engine's own
    number: int = -1  # in order of admission (ranks name a request by it)
    leaving: bool = False  # cancelled as of the step running now (every rank decides alike)
    ids: list[int] = field(default_factory=list)  # generated so far
    _text: TextDecoder | None = None  # the reply's text, token by token
    _pending: str = ""  # text held back: it may be the start of a stop string
    _generator: torch.Generator | None = None

    def cancel(self) -> None:
        """Stop generating for this request (it leaves the batch at the next step)."""
        self.cancelled.set()


@dataclass(eq=False)
class _Group:
    """Rows sharing one cache: the whole batch, or one request of a model whose cache
    cannot take padded rows."""

    jobs: list[Job]
    cache: Any
    pads: list[int]  # left padding of each row, tokens
    length: int  # tokens in the cache, padding included
    batched: bool  # whether other rows may join


class Engine:
    """Runs `model` on one worker thread, decoding up to `max_batch` requests together.

    `submit` queues a Job (QueueFull when `queue_size` are already waiting); its events
    come through `job.emit`. `close()` ends every request (finish_reason "abort") and
    stops the thread.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch: int,
        queue_size: int = 64,
        ranks: Ranks | None = None,
        on_failure: Callable[[], None] | None = None,
    ):
        """`ranks`: the ranks of a pipeline (torchrun). Rank 0's engine takes requests and
        shares each step's admissions and cancellations; the other ranks call `follow()`,
        which runs the same steps in step with it. When another rank fails, every request
        ends with that error, the engine closes, `failure` holds the error and `on_failure`
        is called (the server stops)."""
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.queue_size = queue_size
        self._eos = eos_ids(model, tokenizer)
        self._device = input_device(model)
        self._waiting: deque[Job] = deque()
        self._groups: list[_Group] = []
        self._wake = threading.Condition()
        self._closing = False
        self._keep = _takes(model, "logits_to_keep")
        # rows of different lengths share a forward only with positions of their own
        self._positions = _takes(model, "position_ids")
        self._can_batch: bool | None = None if self._positions else False
        # transformers 5.24 renamed past_key_values (input and output) to cache
        self._cache_arg = "cache" if _takes(model, "cache") else "past_key_values"
        self.forwards = 0  # model forwards run (prefills and decode steps)
        self.decode_steps = 0  # decode forwards: one per step of the batch
        self.tokens = 0  # tokens generated, all requests together
        self._ranks = ranks
        self._on_failure = on_failure
        self.failure: RankFailed | None = None
        self._admitted = 0  # requests admitted so far (their numbers)
        self._thread = threading.Thread(target=self._loop, name="devicemap-serve", daemon=True)
        if ranks is None or ranks.rank == 0:
            self._thread.start()

    # --- the caller's side ---------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue `job`; QueueFull when the queue is full, EngineClosed after close()."""
        check_vocabulary(self.model, torch.tensor([list(job.prompt_ids)]))
        with self._wake:
            if self._closing:
                raise EngineClosed("the server is shutting down")
            if self.active + len(self._waiting) >= self.max_batch + self.queue_size:
                raise QueueFull(
                    f"{self.active} requests are being generated and {len(self._waiting)} are"
                    " waiting, the most this server queues: retry later"
                )
            self._waiting.append(job)
            self._wake.notify()

    @property
    def active(self) -> int:
        return sum(len(g.jobs) for g in self._groups)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def close(self, *, wait: bool = True) -> None:
        """End every request (waiting ones too) with finish_reason "abort" once the step
        running now is done, and stop the thread (waiting for it with `wait`)."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if wait:
            self._thread.join()

    # --- the worker ----------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._steps()
        except RankFailed as error:  # another rank died or hung: no step can run any more
            self.failure = error
            with self._wake:
                self._closing = True
                jobs = [*self._waiting, *self._jobs()]
                self._waiting.clear()
                self._groups.clear()
            self._fail(jobs, error)
            if self._on_failure is not None:
                self._on_failure()

    def _steps(self) -> None:
        while True:
            with self._wake:
                while not self._closing and not self._waiting and not self._groups:
                    self._wake.wait()
                closing = self._closing
                free = self.max_batch - self.active
                count = 0 if closing else min(free, len(self._waiting))
                admitted = [self._waiting.popleft() for _ in range(count)]
            for job in admitted:
                job.number, self._admitted = self._admitted, self._admitted + 1
            leaving = [j for j in (*self._jobs(), *admitted) if j.cancelled.is_set()]
            if self._ranks is not None:  # the other ranks take this step as it is
                tick = (closing, [_shared_job(j) for j in admitted], [j.number for j in leaving])
                share(tick, 0, timeout=IDLE_S)
            if closing:
                break
            for job in leaving:
                job.leaving = True
            self._tick(admitted)
        with self._wake:
            left = [*self._waiting, *(j for g in self._groups for j in g.jobs)]
            self._waiting.clear()
            self._groups.clear()
        for job in left:
            self._end(job, "abort")

    def _tick(self, admitted: list[Job]) -> None:
        """One step: admit (prefill) `admitted`, then advance every row by one token."""
        gone = [j for j in admitted if j.leaving]  # left while waiting
        for job in gone:
            self._end(job, "abort")
        try:
            with torch.no_grad():
                self._admit([j for j in admitted if j not in gone])
                self._step()
        except RankFailed:
            raise  # another rank is gone: this engine cannot go on
        except Exception as error:  # a bug here must not stop the server: fail the rows
            jobs = list(self._jobs())
            self._groups.clear()
            self._fail(jobs, error)

    def _jobs(self) -> Iterator[Job]:
        return (j for g in self._groups for j in g.jobs)

    def follow(self) -> None:
        """The other ranks of a pipeline: run rank 0's steps (its admissions, cancellations)
        until its engine closes; nothing is emitted here."""
        assert self._ranks is not None and self._ranks.rank != 0
        while True:
            closing, shared, leaving = share(None, 0, timeout=IDLE_S)
            if closing:
                return
            admitted = []
            for prompt_ids, sampling, stop, inputs in shared:
                job = Job(prompt_ids, sampling, emit=_ignore, stop=stop, inputs=inputs)
                job.number, self._admitted = self._admitted, self._admitted + 1
                admitted.append(job)
            gone = set(leaving)
            for job in (*self._jobs(), *admitted):
                job.leaving = job.number in gone
            self._tick(admitted)

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill `jobs` and add them to the batch: those without images in one forward
        once the model is known to take padded rows (its first request tells), else alone."""
        plain = [j for j in jobs if not j.inputs]
        groups = [[j] for j in jobs if j.inputs]
        if plain and self._can_batch is None:
            groups.append([plain.pop(0)])  # learn whether its cache takes padded rows
        groups += [[j] for j in plain] if self._can_batch is False else []
        pending = plain if self._can_batch is not False else []
        while groups or pending:
            if not groups:  # the batchable rest, once _can_batch is known
                if self._can_batch is False:
                    groups, pending = [[j] for j in pending], []
                    continue
                groups, pending = [pending], []
            group = groups.pop(0)
            try:
                added, logits = self._prefill(group)
            except Exception as error:
                self._fail(group, error)
                continue
            if self._can_batch is None:
                self._can_batch = added.batched
            self._sample_and_emit(added, logits)
            if added.jobs:
                self._join(added)

    def _prefill(self, jobs: list[Job]) -> tuple[_Group, torch.Tensor]:
        """One forward over the prompts of `jobs`, left-padded to the longest: their cache
        and each one's last logits [rows, V]."""
        lengths = [len(j.prompt_ids) for j in jobs]
        width = max(lengths)
        pads = [width - n for n in lengths]
        ids = torch.zeros((len(jobs), width), dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for row, (job, pad) in enumerate(zip(jobs, pads, strict=True)):
            ids[row, pad:] = torch.tensor(list(job.prompt_ids))
            mask[row, pad:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        inputs: dict[str, Any] = {}
        if len(jobs) == 1 and jobs[0].inputs:
            inputs = {k: to_device(v, self._device) for k, v in jobs[0].inputs.items()}
        for job in jobs:
            job._generator = _generator(job.sampling)
        out = self._forward(ids, mask, positions, None, **inputs)
        cache = getattr(out, self._cache_arg, None)
        batched = self._can_batch is not False and _batchable(cache)
        return _Group(list(jobs), cache, pads, width, batched), out.logits[:, -1, :].float()

    def _join(self, group: _Group) -> None:
        """Merge `group` into the batch when both can take padded rows, else keep it apart."""
        batch = next((g for g in self._groups if g.batched), None)
        if batch is None or not group.batched:
            self._groups.append(group)
            return
        width = max(batch.length, group.length)
        for into, new in zip(_layers(batch.cache), _layers(group.cache), strict=True):
            for kind in ("keys", "values"):
                ours = _pad_left(getattr(into, kind), width - batch.length)
                theirs = _pad_left(getattr(new, kind), width - group.length)
                setattr(into, kind, torch.cat([ours, theirs]))
        batch.pads = [p + width - batch.length for p in batch.pads] + [
            p + width - group.length for p in group.pads
        ]
        batch.jobs += group.jobs
        batch.length = width

    def _step(self) -> None:
        """One decode step of every group: one forward per group (one in all when batched)."""
        for group in list(self._groups):
            self._drop_cancelled(group)
            if not group.jobs:
                self._groups.remove(group)
                continue
            ids = torch.tensor([[j.ids[-1]] for j in group.jobs])
            mask = torch.ones((len(group.jobs), group.length + 1), dtype=torch.long)
            for row, pad in enumerate(group.pads):
                mask[row, :pad] = 0
            positions = torch.tensor([[group.length - pad] for pad in group.pads])
            try:
                out = self._forward(ids, mask, positions, group.cache)
            except Exception as error:
                self._groups.remove(group)
                self._fail(group.jobs, error)
                continue
            self.decode_steps += 1
            group.length += 1
            self._sample_and_emit(group, out.logits[:, -1, :].float())
            if not group.jobs:
                self._groups.remove(group)

    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: Any,
        **inputs: Any,
    ) -> Any:
        device = self._device
        kwargs: dict[str, Any] = dict(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            use_cache=True,
            **inputs,
        )
        if cache is not None:
            kwargs[self._cache_arg] = cache
        if self._positions:
            kwargs["position_ids"] = positions.to(device)
        if self._keep:
            kwargs["logits_to_keep"] = 1
        self.forwards += 1
        return self.model(**kwargs)

    # --- tokens and text -----------------------------------------------------------------

    def _sample_and_emit(self, group: _Group, logits: torch.Tensor) -> None:
        """Pick each row's next token, hand out its text, and remove the rows that finished."""
        keep = []
        for row, job in enumerate(group.jobs):
            token = self._pick(job, logits[row : row + 1])
            job.ids.append(token)
            self.tokens += 1
            finish: Finish | None = None
            if token in self._eos:
                finish = "stop"
            elif len(job.ids) >= job.sampling.max_new_tokens:
                finish = "length"
            text, stopped = self._text(job, final=finish is not None)
            if stopped:
                finish = "stop"
            if text:
                job.emit(Event("text", text=text))
            if finish is not None or job.leaving:
                self._end(job, finish or "abort")
            else:
                keep.append(row)
        if len(keep) < len(group.jobs):
            self._keep_rows(group, keep)

    def _pick(self, job: Job, logits: torch.Tensor) -> int:
        """The next token of `job` from its logits [1, V]: greedy or sampled with its own
        settings and generator (so a seeded request gives the same text in any batch)."""
        s = job.sampling
        scores = logits
        if s.repetition_penalty != 1.0:
            seen = torch.tensor([[*job.prompt_ids, *job.ids]], device=logits.device)
            picked = scores.gather(1, seen)
            picked = torch.where(
                picked < 0, picked * s.repetition_penalty, picked / s.repetition_penalty
            )
            scores = scores.scatter(1, seen, picked)
        if s.greedy:
            return int(scores.argmax(-1))
        scores = scores / s.temperature
        if s.top_k > 0:
            kth = torch.topk(scores, min(s.top_k, scores.shape[-1])).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if s.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=True)
            cumulative = ordered.softmax(-1).cumsum(-1)
            cut = cumulative - ordered.softmax(-1) >= s.top_p  # keeps the token crossing top_p
            scores = scores.scatter(1, order, ordered.masked_fill(cut, float("-inf")))
        probs = scores.softmax(-1).cpu()
        return int(torch.multinomial(probs, 1, generator=job._generator))

    def _text(self, job: Job, *, final: bool) -> tuple[str, bool]:
        """Text added by the last token (held back while it may be half a character or the
        start of a stop string), and whether a stop string ended the reply."""
        if job._text is None:
            job._text = TextDecoder(self.tokenizer)
        token = job.ids[-1:]
        if token and token[0] in self._eos:
            piece = job._text.flush()  # the end-of-sequence token has no text
        else:
            piece = job._text.add(token) + (job._text.flush() if final else "")
        text = job._pending + piece
        job._pending = ""
        if not job.stop:
            return text, False
        for stop in job.stop:
            at = text.find(stop)
            if at >= 0:
                return text[:at], True
        if not final:
            hold = _stop_prefix(text, job.stop)
            if hold:
                text, job._pending = text[:-hold], text[-hold:]
        return text, False

    # --- rows leaving ----------------------------------------------------------------------

    def _drop_cancelled(self, group: _Group) -> None:
        keep = [row for row, job in enumerate(group.jobs) if not job.leaving]
        for job in group.jobs:
            if job.leaving:
                self._end(job, "abort")
        if len(keep) < len(group.jobs):
            self._keep_rows(group, keep)

    def _keep_rows(self, group: _Group, rows: list[int]) -> None:
        """Keep only `rows` of `group`, and cut the left padding they all share."""
        group.jobs = [group.jobs[r] for r in rows]
        group.pads = [group.pads[r] for r in rows]
        if not rows:
            return
        index = torch.tensor(rows)
        shared = min(group.pads)
        for layer in _layers(group.cache):
            if getattr(layer, "keys", None) is None:
                continue
            where = index.to(layer.keys.device)
            layer.keys = layer.keys[where, :, shared:]
            layer.values = layer.values[where, :, shared:]
        group.pads = [p - shared for p in group.pads]
        group.length -= shared

    def _end(self, job: Job, finish: Finish) -> None:
        job.emit(
            Event(
                "end",
                finish_reason=finish,
                prompt_tokens=len(job.prompt_ids),
                completion_tokens=len(job.ids),
            )
        )

    def _fail(self, jobs: Sequence[Job], error: Exception) -> None:
        """The model failed on these requests: each gets the error; the server goes on."""
        if not isinstance(error, DevicemapError):
            reason = " ".join(str(error).split())[:300] or type(error).__name__
            failure: Exception = GenerationFailed(
                f"the model failed while generating ({type(error).__name__}: {reason})"
            )
            failure.__cause__ = error
        else:
            failure = error
        for job in jobs:
            job.emit(Event("error", error=failure))


# --- helpers -------------------------------------------------------------------------------

IDLE_S = 7 * 24 * 3600.0  # how long the other ranks wait for rank 0's next step (an idle server)


def _shared_job(job: Job) -> tuple[Any, ...]:
    """What the other ranks need of a request (an unseeded sampler gets a seed here, so
    every rank draws the same tokens)."""
    sampling = job.sampling
    if not sampling.greedy and sampling.seed is None:
        sampling = dataclasses.replace(sampling, seed=random.randrange(2**63))
        job.sampling = sampling
    return (list(job.prompt_ids), sampling, job.stop, job.inputs)


def _ignore(event: Event) -> None:
    """The other ranks' requests: rank 0 answers the clients."""


def _takes(model: Any, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _generator(sampling: Sampling) -> torch.Generator | None:
    if sampling.greedy:
        return None
    seed = sampling.seed if sampling.seed is not None else random.SystemRandom().getrandbits(63)
    return torch.Generator().manual_seed(seed)


def _layers(cache: Any) -> list[Any]:
    return list(getattr(cache, "layers", ()))


def _batchable(cache: Any) -> bool:
    """Whether rows of other requests can be padded into `cache`: a DynamicCache of plain
    full-attention layers (no sliding window, no recurrent state, no encoder cache)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    layers = _layers(cache)
    return (
        type(cache) is DynamicCache
        and bool(layers)
        and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)
    )


def _pad_left(tensor: torch.Tensor, tokens: int) -> torch.Tensor:
    """`tensor` [B, H, T, D] with `tokens` zero positions before its first."""
    if tokens == 0:
        return tensor
    shape = (*tensor.shape[:-2], tokens, tensor.shape[-1])
    return torch.cat([tensor.new_zeros(shape), tensor], dim=-2)


def _stop_prefix(text: str, stops: Sequence[str]) -> int:
    """The length of the longest end of `text` that begins some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if stop.startswith(text[-n:]):
                best = n
                break
    return best
