"""Measure a model as loaded: load time, prefill and decode speed, peak memory per device.

What `devicemap bench` prints. Peaks are set next to the plan's bytes for the same
device, each labelled with how it was measured: CUDA's allocator high-water mark per
GPU; on Linux, the growth of anonymous resident memory (tensors in RAM) for the cpu
and of file-backed resident pages (memory-mapped checkpoint data) for the disk.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from transformers.generation.streamers import BaseStreamer

from ..devices import CPU, DISK, Device
from ..errors import BadOption
from ..plan.planner import Plan
from ..run.pages import file_mappings, page_ranges, resident_bytes


@dataclass(frozen=True)
class BenchOptions:
    prompt_tokens: int = 128  # prefill length, random tokens
    new_tokens: int = 32  # tokens decoded per run (end of sequence ignored)
    runs: int = 3  # the median is reported

    def __post_init__(self) -> None:
        bad = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) < 1]
        if bad:
            listed = ", ".join(f"--{n.replace('_', '-')} {getattr(self, n)}" for n in bad)
            raise BadOption(f"{listed}: each must be at least 1", options=tuple(bad))

    @property
    def context(self) -> int:
        """Tokens per sequence the benchmark needs."""
        return self.prompt_tokens + self.new_tokens


@dataclass
class DevicePeak:
    """One device: what the plan reserved next to what was measured, in bytes."""

    device: Device
    planned: dict[str, int]  # weights, kv_cache, workspace, logits, staging, total
    peak: int | None  # None where nothing could be measured
    measured: str  # how `peak` was measured: a key of MEASURES


@dataclass
class BenchResult:
    model: str
    context: int  # tokens the plan holds
    options: BenchOptions
    load_s: float
    prefill_s: list[float]  # per run
    decode_s: list[float]  # per run, first new token to the last
    decoded: list[int]  # tokens after the first, per run
    devices: list[DevicePeak] = field(default_factory=list)

    @property
    def prompt_tokens(self) -> int:
        return self.options.prompt_tokens

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / statistics.median(self.prefill_s)

    @property
    def decode_tok_s(self) -> float:
        rates = [n / t for n, t in zip(self.decoded, self.decode_s, strict=True) if t > 0]
        return statistics.median(rates) if rates else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "context": self.context,
            **dataclasses.asdict(self.options),
            "load_s": self.load_s,
            "prefill_tok_s": self.prefill_tok_s,
            "decode_tok_s": self.decode_tok_s,
            "prefill_s": self.prefill_s,
            "decode_s": self.decode_s,
            "devices": [dataclasses.asdict(d) | {"device": str(d.device)} for d in self.devices],
        }


def bench(load: Callable[[], Any], plan: Plan, *, vocab: int, options: BenchOptions) -> BenchResult:
    """Call `load()` once (timed) for the model, then time `options.runs` greedy generations."""
    for usage in plan.devices:
        if usage.device.kind == "cuda":
            torch.cuda.reset_peak_memory_stats(usage.device.index)
    with RssSampler() as rss:
        start = time.perf_counter()
        model = load()
        load_s = time.perf_counter() - start
        ids = random_prompt(vocab, options.prompt_tokens)
        timings = [time_generate(model, ids, options.new_tokens) for _ in range(options.runs)]
    mapped = mapped_cpu_weights(model, plan)
    return BenchResult(
        model=plan.model,
        context=plan.options.context,
        options=options,
        load_s=load_s,
        prefill_s=[t[0] for t in timings],
        decode_s=[t[1] for t in timings],
        decoded=[t[2] for t in timings],
        devices=[peak_of(u.device, plan, rss, mapped) for u in plan.devices],
    )


def mapped_cpu_weights(model: torch.nn.Module, plan: Plan) -> int | None:
    """Resident bytes of the cpu tier's weights that are the checkpoint's own pages.

    devicemap keeps cpu-stored weights whose dtype matches the checkpoint as copy-on-write
    views of the file: resident, but counted by the kernel as file pages (RssFile), not
    anonymous memory. Measured with mincore over the spans that /proc/self/maps shows as
    file mappings; None off Linux."""
    files = file_mappings()
    if files is None:
        return None
    blocks = [
        model.get_submodule(name)
        for name, where in plan.device_map.items()
        if where == CPU.map_value
    ]
    tensors = {t.data_ptr(): t for m in blocks for t in [*m.parameters(), *m.buffers()]}
    mapped = [t for ptr, t in tensors.items() if any(m.start <= ptr < m.end for m in files)]
    return resident_bytes(page_ranges(mapped))


def random_prompt(vocab: int, tokens: int) -> torch.Tensor:
    """[1, tokens] int64 ids drawn from the vocabulary with a fixed seed."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (1, tokens), generator=generator)


class _Clock(BaseStreamer):  # type: ignore[misc]
    """Times `generate`: put() gets the prompt first, then each new token."""

    def __init__(self) -> None:
        self.times: list[float] = []  # perf_counter seconds

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def time_generate(model: Any, ids: torch.Tensor, new_tokens: int) -> tuple[float, float, int]:
    """(prefill s, decode s, tokens decoded after the first) of one greedy generation."""
    clock = _Clock()
    config = model.generation_config
    eos = config.eos_token_id
    pad = config.pad_token_id if config.pad_token_id is not None else eos
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # no early end of sequence: every run decodes as much
            pad_token_id=pad[0] if isinstance(pad, list) else pad,
            streamer=clock,
        )
    first = clock.times[1] if len(clock.times) > 1 else time.perf_counter()
    return first - start, clock.times[-1] - first, max(len(clock.times) - 2, 0)


class RssSampler:
    """Peak growth of this process's resident memory, sampled every 10 ms in a thread.

    On Linux it splits anonymous memory (tensors: the cpu tier) from file-backed pages
    (memory-mapped checkpoint data: the disk tier's resident part).
    """

    interval_s = 0.01

    def __init__(self) -> None:
        self.start = read_rss()
        self.peak = dict(self.start)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.ru_start = ru_maxrss()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._take()

    def growth(self, kind: str) -> int | None:
        """Peak minus start, bytes, for "anon", "file" or "total"; None if not measured."""
        if kind not in self.start:
            return None
        grown = self.peak[kind] - self.start[kind]
        if kind == "total":  # the kernel's own high-water mark sees peaks between samples
            ru_end = ru_maxrss()
            if ru_end is not None and self.ru_start is not None and ru_end > self.ru_start:
                grown = max(grown, ru_end - self.start[kind])
        return max(grown, 0)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._take()

    def _take(self) -> None:
        for kind, value in read_rss().items():
            self.peak[kind] = max(self.peak.get(kind, 0), value)


def read_rss() -> dict[str, int]:
    """{"total": bytes, and on Linux "anon" and "file": bytes} resident now."""
    rss = {"total": int(psutil.Process().memory_info().rss)}
    status = Path(f"/proc/{os.getpid()}/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                rss[key[3:].lower()] = int(value.split()[0]) * 1024  # kB -> bytes
    return rss


def ru_maxrss() -> int | None:
    """The process's peak resident bytes so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


# how a peak was measured: short label -> what it means
MEASURES = {
    "cuda peak": "torch.cuda.max_memory_allocated on that GPU",
    "RSS anon": "peak growth of anonymous resident memory (RssAnon, sampled every 10 ms)",
    "RSS anon + mapped": "RSS anon, plus the resident pages (mincore) of cpu-stored weights"
    " that are the checkpoint's copy-on-write pages",
    "RSS file": "peak growth of resident file pages (RssFile): mmap'd checkpoint, also libraries",
    "RSS file - cpu mapped": "RSS file, less the cpu-stored weights' pages counted above",
    "RSS": "peak growth of resident memory (psutil, ru_maxrss)",
    "-": "not measured",
}


def peak_of(device: Device, chosen: Plan, rss: RssSampler, mapped: int | None) -> DevicePeak:
    """The plan's bytes for `device` next to its measured peak growth.

    `mapped`: resident bytes of cpu-tier weights that are file pages (mapped_cpu_weights),
    moved from the file pages' growth (the disk's) to the cpu's."""
    usage = chosen.usage(device)
    planned = {
        "weights": usage.weights,
        "kv_cache": usage.kv_cache,
        "workspace": usage.workspace,
        "logits": usage.logits,
        "staging": usage.staging,
        "total": usage.used,
    }
    peak: int | None = None
    how = "-"
    if device.kind == "cuda":
        peak, how = int(torch.cuda.max_memory_allocated(device.index)), "cuda peak"
    elif device == DISK:
        peak, how = rss.growth("file"), "RSS file"
        if peak is not None and mapped is not None:
            peak, how = max(peak - mapped, 0), "RSS file - cpu mapped"
    elif device.kind == "cpu":
        peak, how = rss.growth("anon"), "RSS anon"
        if peak is not None and mapped is not None:
            peak, how = peak + mapped, "RSS anon + mapped"
        if peak is None:
            peak, how = rss.growth("total"), "RSS"
    return DevicePeak(device, planned, peak, how if peak is not None else "-")
