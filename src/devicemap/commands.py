"""The `run`, `chat` and `bench` commands: plan (or reuse a saved plan), load, generate.

Progress, notes and summaries go to stderr; replies (or one JSON object) to stdout, so
`devicemap run ... > answer.txt` and `... --json | jq` see only the answer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, cast

import psutil
import torch
import typer
from rich import box
from rich.console import Console
from rich.table import Table
from transformers.generation.streamers import BaseStreamer

from .checkpoint import ModelSource, resolve_model
from .cli import (
    BatchOpt,
    ContextOpt,
    DtypeOpt,
    GpusOpt,
    LogitsOpt,
    MaxMemoryOpt,
    ModelArg,
    OffloadExecOpt,
    PinOpt,
    StrategyOpt,
    app,
    model_argument,
    parse_gpus,
    parse_max_memory,
    parse_pin_options,
    reporting_errors,
    short_size,
)
from .devices import DISK, Device, parse_device
from .dispatch import release
from .errors import BadOption, DevicemapError, ModelNotFound
from .generate import Chat, Reply, ReplyStream, Sampling, build_prompt, check_context
from .generate import stream_reply as start_reply
from .load import load
from .plan import Logits, OffloadExec, Plan, Strategy, plan
from .skeleton import Skeleton, build_skeleton

# --- shared options ----------------------------------------------------------------

PlanFileOpt = Annotated[
    str | None,
    typer.Option(
        "--plan",
        help="Reuse a plan saved by `devicemap plan --save` instead of planning (then give no"
        " planning options).",
    ),
]
PromptOpt = Annotated[str, typer.Option("--prompt", "-p", help="The prompt; '-' reads stdin.")]
SystemOpt = Annotated[
    str | None, typer.Option("--system", help="A system message before the conversation.")
]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate.")]
TemperatureOpt = Annotated[
    float, typer.Option("--temperature", "-t", help="0 is greedy; higher samples more freely.")
]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Nucleus sampling in (0, 1]; 1 = off.")]
TopKOpt = Annotated[int, typer.Option("--top-k", help="Sample from the k likeliest; 0 = off.")]
RepetitionOpt = Annotated[
    float, typer.Option("--repetition-penalty", help="> 1 discourages repeats; 1 = off.")
]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Makes sampling reproducible.")]
RawOpt = Annotated[
    bool, typer.Option("--raw", help="Feed the prompt as is, without the chat template.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print only one JSON object on stdout.")]

# the parameters every command shares with `devicemap plan`; --plan replaces all of them
PLANNING = (
    "max_memory",
    "gpus",
    "context",
    "batch",
    "dtype",
    "strategy",
    "pin",
    "offload_exec",
    "logits",
)
_GIVEN = ("COMMANDLINE", "ENVIRONMENT")  # click ParameterSource names: typed by the user
INTERRUPTED = 130  # exit status after Ctrl-C, as shells report SIGINT

stderr = Console(stderr=True, highlight=False, soft_wrap=True)


# --- planning and loading ------------------------------------------------------------


@dataclass
class Session:
    """A model loaded for one command, with its tokenizer, plan and how long each step took."""

    source: ModelSource
    tokenizer: Any
    skeleton: Skeleton
    plan: Plan
    plan_s: float  # seconds to build the skeleton and plan (or read the saved plan)
    model: Any = None
    load_s: float = 0.0

    def load(self) -> None:
        start = time.perf_counter()
        self.model = load(self.skeleton, self.plan, progress=stderr.is_terminal)
        self.load_s = time.perf_counter() - start
        stderr.print(f"loaded in {self.load_s:.1f} s")

    def close(self) -> None:
        if self.model is not None:
            release(self.model)
            self.model = None


def open_model(model: str | None) -> tuple[ModelSource, Any]:
    """MODEL resolved on this machine (ModelNotFound if it is not here) and its tokenizer."""
    source = resolve_model(model_argument(cast(str, model)))
    return source, load_tokenizer(source)


@contextmanager
def session(
    ctx: typer.Context, source: ModelSource, tokenizer: Any, *, context: int | None = None
) -> Iterator[Session]:
    """Plan (or read --plan) and yield the Session; `context` replaces the default context.

    The caller loads the model with `s.load()`; it is released when the block ends.
    """
    start = time.perf_counter()
    with stderr.status(f"planning {source.name}"):
        skeleton, chosen = plan_for(ctx, source, context=context)
    s = Session(source, tokenizer, skeleton, chosen, time.perf_counter() - start)
    verb = "read plan" if ctx.params.get("plan_file") else "planned"
    stderr.print(
        f"{verb} in {s.plan_s:.1f} s: {placement_line(chosen)}; context {chosen.options.context}"
    )
    try:
        yield s
    finally:
        s.close()


def plan_for(
    ctx: typer.Context, source: ModelSource, *, context: int | None
) -> tuple[Skeleton, Plan]:
    """The skeleton and the plan: the saved --plan (checked against the model) or a new one."""
    p = ctx.params
    if p.get("plan_file") is not None:
        return saved_plan(ctx, source, p["plan_file"])
    skeleton = build_skeleton(source, dtype=p["dtype"])
    if p["context"] is not None:
        context = p["context"]  # the user's --context wins
    elif context is not None and skeleton.max_positions is not None:
        context = min(context, skeleton.max_positions)  # check_context then says what is too long
    made = plan(
        skeleton,
        max_memory=parse_max_memory(p["max_memory"]),
        gpus=parse_gpus(p["gpus"]),
        context=context,
        batch=p["batch"],
        strategy=cast(Strategy, p["strategy"]),
        pins=parse_pin_options(p["pin"]),
        offload_exec=cast(OffloadExec, p["offload_exec"]),
        logits=cast(Logits, p["logits"]),
    )
    return skeleton, made


def saved_plan(ctx: typer.Context, source: ModelSource, path: str) -> tuple[Skeleton, Plan]:
    """The plan in `path`, refused when planning options are also given or its model differs."""
    given = [name for name in PLANNING if _typed(ctx, name)]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise BadOption(
            f"--plan reuses a saved plan, so planning options cannot change it: drop {flags},"
            " or drop --plan to plan again",
            options=tuple(given),
        )
    saved = Plan.load(path)
    skeleton = build_skeleton(source, dtype=saved.dtype)
    saved.check(skeleton)  # PlanMismatch: the plan belongs to another model or dtype
    return skeleton, saved


def _typed(ctx: typer.Context, name: str) -> bool:
    """True when the user gave option `name` (not its default)."""
    return getattr(ctx.get_parameter_source(name), "name", None) in _GIVEN


def load_tokenizer(source: ModelSource) -> Any:
    """The tokenizer saved next to the model's config, read offline."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.root, local_files_only=True)
    except Exception as error:  # transformers raises OSError, ValueError, TypeError ...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelNotFound(
            f"no usable tokenizer in {source.root} ({reason}). devicemap needs the model's"
            " tokenizer files (tokenizer.json and tokenizer_config.json) next to its"
            " config.json: copy them from where the model came from"
        ) from None


def placement_line(chosen: Plan) -> str:
    """'cpu: 14 blocks, disk: 18 blocks (run on cpu)': blocks per storage device."""
    stored = placement(chosen)
    runs = sorted({str(parse_device(v)) for v in chosen.exec_map.values()})
    parts = [f"{device}: {n} block{'s' * (n != 1)}" for device, n in stored.items()]
    return f"{', '.join(parts)} (run on {', '.join(runs)})"


def placement(chosen: Plan) -> dict[str, int]:
    """Blocks per storage device, in the plan's device order."""
    counts: dict[str, int] = {}
    for usage in chosen.devices:
        n = sum(1 for v in chosen.device_map.values() if parse_device(v) == usage.device)
        if n:
            counts[str(usage.device)] = n
    return counts


@contextmanager
def command_errors() -> Iterator[None]:
    """devicemap errors: one line, status 1 (cli.reporting_errors); Ctrl-C: status 130."""
    try:
        with reporting_errors():
            yield
    except KeyboardInterrupt:
        typer.echo("\n[interrupted]", err=True)
        raise typer.Exit(INTERRUPTED) from None


def sampling_from(ctx: typer.Context) -> Sampling:
    """The sampling options, validated all at once (BadOption names each bad one)."""
    p = ctx.params
    return Sampling(
        max_new_tokens=p["max_new_tokens"],
        temperature=p["temperature"],
        top_p=p["top_p"],
        top_k=p["top_k"],
        repetition_penalty=p["repetition_penalty"],
        seed=p["seed"],
    )


# --- run -----------------------------------------------------------------------------


@app.command("run")
def run_command(
    ctx: typer.Context,
    model: ModelArg,
    prompt: PromptOpt,
    max_memory: MaxMemoryOpt = None,
    gpus: GpusOpt = None,
    context: ContextOpt = None,
    batch: BatchOpt = 1,
    dtype: DtypeOpt = None,
    strategy: StrategyOpt = "balanced",
    pin: PinOpt = None,
    offload_exec: OffloadExecOpt = "gpu",
    logits: LogitsOpt = "last",
    plan_file: PlanFileOpt = None,
    system: SystemOpt = None,
    raw: RawOpt = False,
    max_new_tokens: MaxNewOpt = 256,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    repetition_penalty: RepetitionOpt = 1.0,
    seed: SeedOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Answer one prompt, streaming the reply as it is generated (greedy by default)."""
    with command_errors():
        sampling = sampling_from(ctx)
        text = sys.stdin.read() if prompt == "-" else prompt
        source, tokenizer = open_model(model)
        messages = [{"role": "system", "content": system}] if system else []
        ids = build_prompt(tokenizer, [*messages, {"role": "user", "content": text}], raw=raw)
        needed = int(ids.shape[-1]) + sampling.max_new_tokens  # tokens: plan for what runs
        with session(ctx, source, tokenizer, context=needed) as s:
            check_context(int(ids.shape[-1]), sampling.max_new_tokens, s.plan.options.context)
            s.load()
            reply = reply_to(s, ids, sampling, show=not as_json)
    if as_json:
        typer.echo(json.dumps(reply_json(s, reply, prompt=text), indent=2))
    else:
        stderr.print(summary_line(reply, s.plan))
    if reply.finish_reason == "interrupted":
        raise typer.Exit(INTERRUPTED)


def reply_to(s: Session, ids: torch.Tensor, sampling: Sampling, *, show: bool) -> Reply:
    """Generate a reply; with `show`, write each piece to stdout as it arrives."""
    with start_reply(s.model, s.tokenizer, ids, sampling) as stream:
        if not show:
            return stream.reply
        if not echo_stream(stream):
            stderr.print("[interrupted]")
        return stream.reply


def echo_stream(stream: ReplyStream) -> bool:
    """Write the pieces to stdout, flushed each; end with a newline; False after Ctrl-C."""
    try:
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:  # the stream has stopped generating; keep what came
        sys.stdout.write("\n")
        sys.stdout.flush()
        return False
    sys.stdout.write("\n")
    sys.stdout.flush()
    return True


def summary_line(reply: Reply, chosen: Plan) -> str:
    """'7 tokens, prefill 0.21 s (35 prompt tokens), decode 9.8 tok/s; cpu: 14 blocks, ...'."""
    return (
        f"{reply.new_tokens} tokens, prefill {reply.prefill_s:.2f} s ({reply.prompt_tokens} prompt"
        f" tokens), decode {reply.tokens_per_s:.1f} tok/s; {placement_line(chosen)}"
    )


def reply_json(s: Session, reply: Reply, *, prompt: str) -> dict[str, Any]:
    return {
        "model": s.source.name,
        "prompt": prompt,
        "reply": reply.text,
        "finish_reason": reply.finish_reason,
        "prompt_tokens": reply.prompt_tokens,
        "new_tokens": reply.new_tokens,
        "timings": {
            "plan_s": s.plan_s,
            "load_s": s.load_s,
            "prefill_s": reply.prefill_s,
            "decode_s": reply.decode_s,
            "decode_tok_s": reply.tokens_per_s,
        },
        "placement": placement(s.plan),  # blocks per storage device
        "device_map": s.plan.device_map,
        "exec_map": s.plan.exec_map,
    }


# --- chat ----------------------------------------------------------------------------


@app.command("chat")
def chat_command(
    ctx: typer.Context,
    model: ModelArg,
    max_memory: MaxMemoryOpt = None,
    gpus: GpusOpt = None,
    context: ContextOpt = None,
    batch: BatchOpt = 1,
    dtype: DtypeOpt = None,
    strategy: StrategyOpt = "balanced",
    pin: PinOpt = None,
    offload_exec: OffloadExecOpt = "gpu",
    logits: LogitsOpt = "last",
    plan_file: PlanFileOpt = None,
    system: SystemOpt = None,
    max_new_tokens: MaxNewOpt = 256,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    repetition_penalty: RepetitionOpt = 1.0,
    seed: SeedOpt = None,
) -> None:
    """Chat with MODEL, one message per line; /reset forgets the history, /exit ends.

    Ctrl-C stops the reply being written, not the session. Standard input may be a pipe.
    """
    with command_errors():
        sampling = sampling_from(ctx)
        with session(ctx, *open_model(model)) as s:
            s.load()
            chat = Chat(
                s.model,
                s.tokenizer,
                sampling=sampling,
                system=system,
                context=s.plan.options.context,
            )
            status = converse(chat, tty=sys.stdin.isatty())
    raise typer.Exit(status)


def converse(chat: Chat, *, tty: bool) -> int:
    """Read messages until /exit or end of input; return the exit status."""
    if tty:
        stderr.print("type a message; /reset forgets the conversation, /exit (or Ctrl-D) ends")
    while True:
        try:
            line = read_message(tty)
        except KeyboardInterrupt:  # at the prompt: leave quietly
            sys.stdout.write("\n")
            return INTERRUPTED
        if line is None or line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            chat.reset()
            stderr.print("[history cleared]")
        elif line.strip():
            answer(chat, line.strip())


def read_message(tty: bool) -> str | None:
    """The next line of input without its newline; None at end of input."""
    if tty:
        try:
            return input("> ")
        except EOFError:
            sys.stdout.write("\n")
            return None
    line = sys.stdin.readline()
    return line.rstrip("\r\n") if line else None


def answer(chat: Chat, text: str) -> None:
    """Stream one reply; a prompt past the context is reported and the session goes on."""
    try:
        stream = chat.send(text)
    except DevicemapError as error:  # ContextTooLong, an empty prompt
        stderr.print(f"error: {error}; /reset starts a new conversation")
        return
    if not echo_stream(stream):
        stderr.print("[interrupted]")
    reply = stream.reply
    stderr.print(f"[{reply.new_tokens} tokens, {reply.tokens_per_s:.1f} tok/s]", style="dim")


# --- bench ---------------------------------------------------------------------------


@app.command("bench")
def bench_command(
    ctx: typer.Context,
    model: ModelArg,
    max_memory: MaxMemoryOpt = None,
    gpus: GpusOpt = None,
    context: ContextOpt = None,
    batch: BatchOpt = 1,
    dtype: DtypeOpt = None,
    strategy: StrategyOpt = "balanced",
    pin: PinOpt = None,
    offload_exec: OffloadExecOpt = "gpu",
    logits: LogitsOpt = "last",
    plan_file: PlanFileOpt = None,
    prompt_tokens: Annotated[
        int, typer.Option("--prompt-tokens", help="Prompt length for prefill (random tokens).")
    ] = 128,
    new_tokens: Annotated[int, typer.Option("--new-tokens", help="Tokens decoded per run.")] = 32,
    runs: Annotated[int, typer.Option("--runs", help="Runs; the median is reported.")] = 3,
    as_json: JsonOpt = False,
) -> None:
    """Time loading, prefill and decode; compare each device's planned bytes with its peak.

    Without --context or --plan it plans for exactly prompt + new tokens, so the planned
    KV cache and workspace are the ones the benchmark uses.
    """
    with command_errors():
        check_bench_options(prompt_tokens=prompt_tokens, new_tokens=new_tokens, runs=runs)
        needed = prompt_tokens + new_tokens  # tokens: plan for what the benchmark runs
        with session(ctx, *open_model(model), context=needed) as s:
            check_context(prompt_tokens, new_tokens, s.plan.options.context)
            result = bench(s, prompt_tokens=prompt_tokens, new_tokens=new_tokens, runs=runs)
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
    else:
        render_bench(result, Console(soft_wrap=False, highlight=False))


def check_bench_options(**values: int) -> None:
    bad = [name for name, value in values.items() if value < 1]
    if bad:
        listed = ", ".join(f"--{n.replace('_', '-')} {values[n]}" for n in bad)
        raise BadOption(f"{listed}: each must be at least 1", options=tuple(bad))


@dataclass
class DevicePeak:
    """One device: what the plan reserved next to what was measured, in bytes."""

    device: Device
    planned: dict[str, int]  # weights, kv_cache, workspace, logits, staging, total
    peak: int | None  # None where nothing could be measured
    measured: str  # how `peak` was measured


@dataclass
class BenchResult:
    model: str
    context: int
    prompt_tokens: int
    new_tokens: int
    runs: int
    load_s: float
    prefill_s: list[float]  # per run
    decode_s: list[float]  # per run, first new token to the last
    decoded: list[int]  # tokens after the first, per run
    devices: list[DevicePeak] = field(default_factory=list)

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
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "runs": self.runs,
            "load_s": self.load_s,
            "prefill_tok_s": self.prefill_tok_s,
            "decode_tok_s": self.decode_tok_s,
            "prefill_s": self.prefill_s,
            "decode_s": self.decode_s,
            "devices": [dataclasses.asdict(d) | {"device": str(d.device)} for d in self.devices],
        }


def bench(s: Session, *, prompt_tokens: int, new_tokens: int, runs: int) -> BenchResult:
    """Load once (timed), then `runs` greedy generations of exactly `new_tokens` tokens."""
    gpus = [u.device for u in s.plan.devices if u.device.kind == "cuda"]
    for gpu in gpus:
        torch.cuda.reset_peak_memory_stats(gpu.index)
    with RssSampler() as rss:
        s.load()
        ids = random_prompt(s.skeleton, prompt_tokens)
        timings = [time_generate(s.model, ids, new_tokens) for _ in range(runs)]
    result = BenchResult(
        model=s.source.name,
        context=s.plan.options.context,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        runs=runs,
        load_s=s.load_s,
        prefill_s=[t[0] for t in timings],
        decode_s=[t[1] for t in timings],
        decoded=[t[2] for t in timings],
    )
    result.devices = [peak_of(u.device, s.plan, rss) for u in s.plan.devices]
    return result


def random_prompt(skeleton: Skeleton, tokens: int) -> torch.Tensor:
    """[1, tokens] int64 ids drawn from the vocabulary with a fixed seed."""
    vocab = int(getattr(skeleton.config.get_text_config(decoder=True), "vocab_size", 0) or 256)
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


def peak_of(device: Device, chosen: Plan, rss: RssSampler) -> DevicePeak:
    usage = chosen.usage(device)
    planned = {
        "weights": usage.weights,
        "kv_cache": usage.kv_cache,
        "workspace": usage.workspace,
        "logits": usage.logits,
        "staging": usage.staging,
        "total": usage.used,
    }
    if device.kind == "cuda":
        peak = int(torch.cuda.max_memory_allocated(device.index))
        return DevicePeak(device, planned, peak, "torch.cuda.max_memory_allocated")
    if device == DISK:
        grown = rss.growth("file")
        how = "peak growth of resident mmap'd file pages (RssFile)"
        return DevicePeak(device, planned, grown, how if grown is not None else "not measured")
    if device.kind == "cpu":
        if (grown := rss.growth("anon")) is not None:
            return DevicePeak(device, planned, grown, "peak growth of anonymous RSS (RssAnon)")
        return DevicePeak(device, planned, rss.growth("total"), "peak RSS growth (ru_maxrss)")
    return DevicePeak(device, planned, None, "not measured")


def render_bench(result: BenchResult, console: Console) -> None:
    console.print(
        f"[bold]{result.model}[/bold]: load {result.load_s:.2f} s; prefill"
        f" {result.prefill_tok_s:.1f} tok/s ({result.prompt_tokens} tokens); decode"
        f" {result.decode_tok_s:.2f} tok/s ({result.new_tokens} tokens); median of {result.runs},"
        f" planned for context {result.context}"
    )
    table = Table(title="memory per device", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("device")
    for column in ("planned", "weights", "KV", "workspace", "logits", "staging", "peak"):
        table.add_column(column, justify="right")
    table.add_column("peak measured as")
    for d in result.devices:
        p = d.planned
        sizes = (p["total"], p["weights"], p["kv_cache"], p["workspace"], p["logits"], p["staging"])
        peak = short_size(d.peak) if d.peak is not None else "-"
        table.add_row(str(d.device), *map(short_size, sizes), peak, d.measured)
    console.print(table)
