"""The `run`, `chat` and `bench` commands: plan (or reuse a saved plan), load, generate.
main.py registers them on the app.

Progress, notes and summaries go to stderr; replies (or one JSON object) to stdout, so
`devicemap run ... > answer.txt` and `... --json | jq` see only the answer.

torch, transformers and the stages that use them are imported inside the functions that
need them, when a command runs: importing this module (for `devicemap --help`) stays light.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from ..devices import parse_device
from ..errors import BadImage, BadOption, ContextTooLong, DevicemapError, ModelNotFound
from .options import (
    REPLANNING,
    ModelArg,
    PlanChoices,
    model_argument,
    options_from,
    reporting_errors,
)
from .tables import short_size

if TYPE_CHECKING:  # annotations only; what runs is imported where it runs
    import torch

    from ..model.checkpoint import ModelSource
    from ..model.skeleton import Skeleton
    from ..plan.planner import Plan
    from ..plan.stages import Stages
    from ..run.generate import Chat, Reply, ReplyStream, Sampling
    from ..run.ranks import Ranks
    from .measure import BenchResult

# --- shared options ----------------------------------------------------------------

PlanFileOpt = Annotated[
    str | None,
    typer.Option(
        "--plan",
        help="Reuse a plan saved by `devicemap plan --save` instead of planning (then give no"
        " planning options).",
    ),
]
# --context as in `devicemap plan`, but run and bench know the context they need
ReplyContextOpt = Annotated[
    int | None,
    typer.Option(
        "--context", "-c", help="Tokens per sequence. Default: this prompt + --max-new-tokens."
    ),
]
BenchContextOpt = Annotated[
    int | None,
    typer.Option("--context", "-c", help="Tokens per sequence. Default: the prompt + new tokens."),
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
ImageOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--image",
        "-i",
        help="An image file to ask about (repeatable), for vision-language models whose"
        " processor takes images.",
    ),
]


@dataclass(frozen=True)
class ReplyPlanChoices(PlanChoices):
    """The planning options with run's --context help."""

    context: ReplyContextOpt = None  # a redeclared field keeps its place: same --help order


@dataclass(frozen=True)
class BenchPlanChoices(PlanChoices):
    """The planning options with bench's --context help."""

    context: BenchContextOpt = None


@dataclass(frozen=True)
class SamplingChoices:
    """The sampling options as typed (fields as in PlanChoices: option and default)."""

    max_new_tokens: MaxNewOpt = 256
    temperature: TemperatureOpt = 0.0
    top_p: TopPOpt = 1.0
    top_k: TopKOpt = 0
    repetition_penalty: RepetitionOpt = 1.0
    seed: SeedOpt = None

    def sampling(self) -> Sampling:
        """The Sampling, validated all at once (BadOption names each bad option)."""
        from ..run.generate import Sampling

        return Sampling(**asdict(self))


_GIVEN = ("COMMANDLINE", "ENVIRONMENT")  # click ParameterSource names: typed by the user
INTERRUPTED = 130  # exit status after Ctrl-C, as shells report SIGINT

stderr = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)


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
    stages: Stages | None = None  # under torchrun: the plan over every rank (plan: this rank's)
    ranks: Ranks | None = None

    @property
    def leader(self) -> bool:
        """Whether this process prints (one process, or rank 0 of several)."""
        return self.ranks is None or self.ranks.rank == 0

    def load(self) -> Any:
        """The model, loaded as the plan says (a progress bar on a terminal)."""
        from ..load.loader import load

        start = time.perf_counter()
        self.model = load(self.skeleton, self.plan, progress=stderr.is_terminal)
        self.load_s = time.perf_counter() - start
        stderr.print(f"loaded in {self.load_s:.1f} s")
        return self.model

    def close(self) -> None:
        if self.model is not None:
            from ..run.dispatch import release

            release(self.model)
            self.model = None


def open_model(
    model: str | None, planning: PlanChoices, *, plan_file: str | None = None
) -> tuple[ModelSource, Any]:
    """MODEL resolved on this machine (ModelNotFound if it is not here) and its tokenizer;
    RemoteCodeNotTrusted first if it needs its own code and --trust-remote-code is not given.
    Without MODEL, a saved --plan names the model (else the demo model)."""
    from ..model.checkpoint import resolve_model
    from ..model.config import refuse_untrusted_code
    from ..plan.planner import Plan

    if model is None and plan_file is not None:
        model = Plan.load(plan_file).model
    source = resolve_model(model_argument(model), revision=planning.revision)
    if not planning.trust_remote_code:
        refuse_untrusted_code(source)
    return source, load_tokenizer(source, trust_remote_code=planning.trust_remote_code)


@contextmanager
def session(
    ctx: typer.Context,
    planning: PlanChoices,
    source: ModelSource,
    tokenizer: Any,
    *,
    context: int | None = None,
    images: int | None = None,
    ranks: Ranks | None = None,
) -> Iterator[Session]:
    """Plan (or read --plan) and yield the Session; `context` and `images` replace the
    defaults (when --context / --images are not given). With `ranks` (torchrun), one plan
    over every rank: the Session holds this rank's.

    The caller loads the model with `s.load()`; it is released when the block ends.
    """
    start = time.perf_counter()
    stages: Stages | None = None
    with stderr.status(f"planning {source.name}"):
        if ranks is None:
            skeleton, chosen = plan_for(ctx, planning, source, context=context, images=images)
        else:
            skeleton, stages = ranked_plan(ctx, planning, source, ranks, context, images)
            chosen = stages.plans[ranks.rank]
    s = Session(source, tokenizer, skeleton, chosen, time.perf_counter() - start, stages=stages)
    s.ranks = ranks
    verb = "read plan" if ctx.params.get("plan_file") else "planned"
    where = f" rank {ranks.rank} of {ranks.size}:" if ranks is not None else ""
    stderr.print(
        f"{verb} in {s.plan_s:.1f} s:{where} {placement_line(chosen)}; context"
        f" {chosen.options.context}"
    )
    try:
        yield s
    finally:
        s.close()


def plan_for(
    ctx: typer.Context,
    planning: PlanChoices,
    source: ModelSource,
    *,
    context: int | None,
    images: int | None = None,
) -> tuple[Skeleton, Plan]:
    """The skeleton and the plan: the saved --plan (checked against the model) or a new one."""
    from ..model.skeleton import build_skeleton

    if ctx.params.get("plan_file") is not None:
        return saved_plan(ctx, source, ctx.params["plan_file"], planning.trust_remote_code)
    trust = planning.trust_remote_code
    skeleton = build_skeleton(source, dtype=planning.dtype, trust_remote_code=trust)
    if context is not None and skeleton.max_positions is not None:
        context = min(context, skeleton.max_positions)  # check_context then says what is too long
    # the user's --context and --images win
    return skeleton, planning.make_plan(skeleton, context=context, images=images)


def ranked_plan(
    ctx: typer.Context,
    planning: PlanChoices,
    source: ModelSource,
    ranks: Ranks,
    context: int | None,
    images: int | None,
) -> tuple[Skeleton, Stages]:
    """The plan over every rank, after checking that they all started alike (RankMismatch)."""
    from .ranked import plan_together

    if ctx.params.get("plan_file") is not None:
        raise BadOption(
            "--plan reads a plan for one process; under torchrun the ranks plan together:"
            " drop --plan",
            options=("plan_file",),
        )
    command = ctx.command.name or ""
    return plan_together(planning, source, ranks, command, context=context, images=images)


def saved_plan(
    ctx: typer.Context, source: ModelSource, path: str, trust_remote_code: bool
) -> tuple[Skeleton, Plan]:
    """The plan in `path`, refused when planning options are also given or its model differs."""
    from ..model.skeleton import build_skeleton
    from ..plan.planner import Plan

    given = [name for name in REPLANNING if _typed(ctx, name)]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise BadOption(
            f"--plan reuses a saved plan, so planning options cannot change it: drop {flags},"
            " or drop --plan to plan again",
            options=tuple(given),
        )
    saved = Plan.load(path)
    skeleton = build_skeleton(source, dtype=saved.dtype, trust_remote_code=trust_remote_code)
    saved.check(skeleton)  # PlanMismatch: the plan belongs to another model or dtype
    return skeleton, saved


def _typed(ctx: typer.Context, name: str) -> bool:
    """True when the user gave option `name` (not its default)."""
    return getattr(ctx.get_parameter_source(name), "name", None) in _GIVEN


def load_tokenizer(source: ModelSource, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved next to the model's config, read offline."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            source.root, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except Exception as error:  # transformers raises OSError, ValueError, TypeError ...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelNotFound(
            f"no usable tokenizer in {source.root} ({reason}). devicemap needs the model's"
            " tokenizer files (tokenizer.json and tokenizer_config.json) next to its"
            " config.json: copy them from where the model came from"
        ) from None


def load_processor(source: ModelSource, *, trust_remote_code: bool = False) -> Any:
    """The processor (tokenizer + image processor) saved next to the model, read offline."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(
            source.root, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except Exception as error:  # OSError, ValueError, KeyError ...
        processor, reason = None, _first_line(error)
    else:
        reason = "its processor is a tokenizer only"
    if processor is None or getattr(processor, "image_processor", None) is None:
        raise BadOption(
            f"--image needs a vision-language model whose processor takes images, and"
            f" {source.name} has none ({reason}): its preprocessor_config.json (and, for a"
            " custom model, its processing code with --trust-remote-code) must be beside it",
            options=("image",),
        )
    return processor


def open_images(paths: list[str]) -> list[Any]:
    """Each file decoded to an RGB image (PIL); BadImage names a file that does not decode."""
    if not paths:
        return []
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        if os.path.exists(path) and not os.path.isfile(path):  # a FIFO would hang the read
            raise BadImage(f"--image {path}: not a regular file; give an image file")
        try:
            with Image.open(path) as picture:
                images.append(picture.convert("RGB"))  # decoded now, the file closed
        except FileNotFoundError:
            raise BadImage(f"--image {path}: no such file") from None
        except Image.DecompressionBombError as error:
            raise BadImage(
                f"--image {path}: too large to decode safely ({_first_line(error)}); scale it"
                " down first"
            ) from None
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise BadImage(
                f"--image {path}: not an image this machine can decode ({_first_line(error)});"
                " give a PNG, JPEG, WebP, GIF or BMP file"
            ) from None
    return images


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


MAX_INPUT = 16 << 20  # characters read from stdin at once: far past any context


def read_stdin() -> str:
    """All of standard input (a prompt given as `-p -`), at most MAX_INPUT characters."""
    text = sys.stdin.read(MAX_INPUT + 1)
    if len(text) > MAX_INPUT:
        raise BadOption(
            f"the prompt on stdin is longer than {MAX_INPUT} characters, more than any context"
            " holds", options=("prompt",),
        )  # fmt: skip
    return text


def read_undecodable_stdin() -> None:
    """Make standard input keep bytes that are not UTF-8 (as surrogate escapes, which
    `valid_text` replaces) instead of failing on them; before anything reads it."""
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(errors="surrogateescape")


def valid_text(text: str, what: str) -> str:
    """`text` with bytes that were not UTF-8 replaced by U+FFFD, and one warning line saying
    so on stderr."""
    from ..run.generate import replace_undecodable

    text, replaced = replace_undecodable(text)
    if replaced:
        stderr.print(
            f"warning: {what} is not valid UTF-8: {replaced} byte{'s' * (replaced != 1)}"
            " replaced by U+FFFD (\ufffd)"
        )
    return text


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
def command_errors(*, as_json: bool = False) -> Iterator[None]:
    """devicemap errors: one line, status 1, and with `as_json` one JSON object on stdout
    (cli.reporting_errors); Ctrl-C: status 130."""
    try:
        with reporting_errors(as_json=as_json):
            yield
    except KeyboardInterrupt:
        typer.echo("\n[interrupted]", err=True)
        raise typer.Exit(INTERRUPTED) from None


# --- run -----------------------------------------------------------------------------


@options_from(planning=ReplyPlanChoices, sampling_choices=SamplingChoices)
def run_command(
    ctx: typer.Context,
    prompt: PromptOpt,
    model: ModelArg = None,
    *,
    planning: PlanChoices,
    plan_file: PlanFileOpt = None,
    system: SystemOpt = None,
    raw: RawOpt = False,
    sampling_choices: SamplingChoices,
    image: ImageOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Answer one prompt, streaming the reply as it is generated (greedy by default)."""
    with command_errors(as_json=as_json):  # Ctrl-C in the imports too: [interrupted], 130
        from ..run.generate import build_image_prompt, build_prompt, check_context
        from .ranked import joined, seeded, shared_input

        sampling = sampling_choices.sampling()
        ranks = joined()  # torchrun: rank 0 reads the prompt, every rank runs its stage
        leader = ranks is None or ranks.rank == 0
        if prompt == "-" and leader:
            read_undecodable_stdin()
        text = valid_text(read_stdin() if prompt == "-" and leader else prompt, "the prompt")
        pictures = open_images(image or []) if leader else []
        source, tokenizer = open_model(model, planning, plan_file=plan_file)
        system = valid_text(system, "--system") if system else None
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": text})
        inputs: dict[str, Any] = {}
        if pictures:
            processor = load_processor(source, trust_remote_code=planning.trust_remote_code)
            ids, inputs = build_image_prompt(processor, messages, pictures)
        else:
            ids = build_prompt(tokenizer, messages, raw=raw)
        if ranks is not None:
            text, ids, inputs, sampling, pictures = shared_input(
                ranks, (text, ids, inputs, seeded(sampling), [None] * len(pictures))
            )
        needed = int(ids.shape[-1]) + sampling.max_new_tokens  # tokens: plan for what runs
        images = len(pictures) if pictures else None
        opened = (source, tokenizer)
        with session(ctx, planning, *opened, context=needed, images=images, ranks=ranks) as s:
            check_context(
                int(ids.shape[-1]),
                sampling.max_new_tokens,
                s.plan.options.context,
                limit=s.skeleton.max_positions,
            )
            s.load()
            reply = reply_to(s, ids, sampling, show=not as_json and s.leader, inputs=inputs)
    if as_json:
        typer.echo(json.dumps(reply_json(s, reply, prompt=text), indent=2))
    else:
        stderr.print(summary_line(reply, s.plan))
    if ranks is not None:
        from ..run.ranks import leave

        leave()
    if reply.finish_reason == "interrupted":
        raise typer.Exit(INTERRUPTED)


def reply_to(
    s: Session,
    ids: torch.Tensor,
    sampling: Sampling,
    *,
    show: bool,
    inputs: dict[str, Any] | None = None,
) -> Reply:
    """Generate a reply; with `show`, write each piece to stdout as it arrives."""
    from ..run.generate import stream_reply as start_reply

    with start_reply(s.model, s.tokenizer, ids, sampling, inputs=inputs) as stream:
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
    except KeyboardInterrupt:  # stop generating (Ctrl-C may land while a piece is written,
        stream.close()  # outside the stream's own wait); keep what came
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
    from .ranked import stage_json

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
        **(stage_json(s.stages, s.ranks.rank) if s.stages and s.ranks else {}),
    }


# --- chat ----------------------------------------------------------------------------


@options_from(planning=PlanChoices, sampling_choices=SamplingChoices)
def chat_command(
    ctx: typer.Context,
    model: ModelArg = None,
    *,
    planning: PlanChoices,
    plan_file: PlanFileOpt = None,
    system: SystemOpt = None,
    sampling_choices: SamplingChoices,
) -> None:
    """Chat with MODEL, one message per line (between \"\"\" lines for several); /help lists
    the commands, /reset forgets the history, /exit ends.

    Ctrl-C stops the reply being written, not the session. Standard input may be a pipe.
    """
    with command_errors():
        from ..run.generate import Chat
        from .ranked import joined, seeded, shared_input

        sampling = sampling_choices.sampling()
        ranks = joined()  # torchrun: rank 0 reads each message and shares it
        if ranks is not None:
            sampling = shared_input(ranks, seeded(sampling))
        opened = open_model(model, planning, plan_file=plan_file)
        with session(ctx, planning, *opened, ranks=ranks) as s:
            s.load()
            chat = Chat(
                s.model,
                s.tokenizer,
                sampling=sampling,
                system=valid_text(system, "--system") if system else None,
                context=s.plan.options.context,
                limit=s.skeleton.max_positions,
            )
            if ranks is None:
                status = converse(chat, tty=sys.stdin.isatty())
            elif ranks.rank == 0:
                status = converse(chat, tty=sys.stdin.isatty(), read=_read_and_share, ranked=True)
            else:
                status = converse(chat, tty=False, read=_shared_message, show=False)
        if ranks is not None and status == 0:  # interrupted: the others stop when rank 0 goes
            from ..run.ranks import leave

            leave()
    raise typer.Exit(status)


CHAT_IDLE_S = 7 * 24 * 3600.0  # how long the other ranks wait for rank 0's next message


def _read_and_share(tty: bool) -> str | None:
    """Rank 0: the next message, shared with every rank (None, the end, on Ctrl-C too)."""
    from ..run.ranks import share

    try:
        message = read_message(tty)
    except KeyboardInterrupt:
        share(None, 0, timeout=CHAT_IDLE_S)
        raise
    share(message, 0, timeout=CHAT_IDLE_S)
    return message


def _shared_message(tty: bool) -> str | None:
    """The other ranks: rank 0's next message, waiting as long as its user takes."""
    from ..run.ranks import share

    message: str | None = share(None, 0, timeout=CHAT_IDLE_S)
    return message


CHAT_HELP = """\
/help          this list
/reset, /clear forget the conversation (the --system message stays)
/exit, /bye    end the chat (so does Ctrl-D)
\"\"\"            begin a message of several lines; a line ending with \"\"\" ends it
Ctrl-C stops the reply being written; at the prompt it ends the chat. Arrow keys edit the
line and recall earlier messages."""
_FENCE = '"""'  # opens and closes a multi-line message, as in ollama


def converse(
    chat: Chat,
    *,
    tty: bool,
    read: Callable[[bool], str | None] | None = None,
    show: bool = True,
    ranked: bool = False,
) -> int:
    """Read messages until /exit or end of input; return the exit status. A message that is
    not valid UTF-8 is answered with U+FFFD for its bad bytes, after a warning. `read`
    replaces reading stdin (ranks share rank 0's messages); without `show` nothing is
    written (the other ranks of a chat follow rank 0's). `ranked` (rank 0 of several):
    Ctrl-C during a reply ends the chat, as the other ranks cannot stop theirs mid-reply."""
    read = read or read_message
    if show:
        read_undecodable_stdin()
    if tty:
        _line_editing()
        stderr.print("type a message; /help lists the commands, /exit (or Ctrl-D) ends")
    while True:
        try:
            message = read(tty)
        except KeyboardInterrupt:  # at the prompt: leave quietly
            sys.stdout.write("\n")
            return INTERRUPTED
        if message is None:
            return 0
        command = message.strip()
        if command in ("/exit", "/bye"):
            return 0
        if command in ("/reset", "/clear"):
            chat.reset()
            if show:
                stderr.print("[history cleared]")
        elif command in ("/help", "/?"):
            if show:
                stderr.print(CHAT_HELP)
        elif re.fullmatch(r"/[A-Za-z?]+", command):
            if show:
                stderr.print(f"unknown command {command}; /help lists them")
        elif command:
            whole = answer(chat, valid_text(message.strip(), "the message"), show=show)
            if ranked and not whole:  # the other ranks cannot stop this reply: end the chat
                return INTERRUPTED


def _line_editing() -> None:
    """readline for input(): arrow keys edit the line, up and down recall earlier messages
    (this session's). Not on every platform (Windows without pyreadline): then plain input."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 - importing it is what turns line editing on


def read_message(tty: bool) -> str | None:
    """The next message: one line without its newline, or the lines between a line
    beginning with \"\"\" and one ending with it; None at end of input."""
    first = _read_line(tty, "> ")
    if first is None or not first.lstrip().startswith(_FENCE):
        return first
    body = first.lstrip()[len(_FENCE) :]
    lines: list[str] = []
    while True:
        if body.rstrip().endswith(_FENCE):
            lines.append(body.rstrip()[: -len(_FENCE)])
            return "\n".join(lines)
        lines.append(body)
        line = _read_line(tty, "... ")
        if line is None:  # end of input inside the message: send what came
            return "\n".join(lines)
        body = line
        if sum(len(x) for x in lines) > MAX_INPUT:
            raise BadOption(
                f"a message is longer than {MAX_INPUT} characters, more than any context"
                " holds; give shorter messages", options=("stdin",),
            )  # fmt: skip


def _read_line(tty: bool, prompt: str) -> str | None:
    """One line of input without its newline; None at end of input."""
    if tty:
        try:
            return input(prompt)
        except EOFError:
            sys.stdout.write("\n")
            return None
    line = sys.stdin.readline(MAX_INPUT + 1)
    if len(line) > MAX_INPUT:  # /dev/zero as stdin, or a file with no newline for GBs
        raise BadOption(
            f"an input line is longer than {MAX_INPUT} characters, more than any context"
            " holds; give shorter messages", options=("stdin",),
        )  # fmt: skip
    return line.rstrip("\r\n") if line else None


def answer(chat: Chat, text: str, *, show: bool = True) -> bool:
    """Stream one reply; a prompt the model cannot take (past the context, refused by the chat
    template, empty) is reported and the session goes on. Without `show`, silently."""
    try:
        stream = chat.send(text)
    except DevicemapError as error:  # ContextTooLong, TemplateError, an empty prompt
        hint = "; /reset starts a new conversation" if isinstance(error, ContextTooLong) else ""
        if show:
            stderr.print(f"error: {error}{hint}")
        return True
    if not show:
        with stream:
            stream.reply  # noqa: B018 - generated to the end, in step with rank 0
        return True
    whole = echo_stream(stream)
    if not whole:
        stderr.print("[interrupted]")
    reply = stream.reply
    stderr.print(f"[{reply.new_tokens} tokens, {reply.tokens_per_s:.1f} tok/s]", style="dim")
    return whole


# --- bench ---------------------------------------------------------------------------


@options_from(planning=BenchPlanChoices)
def bench_command(
    ctx: typer.Context,
    model: ModelArg = None,
    *,
    planning: PlanChoices,
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
    with command_errors(as_json=as_json):
        from ..run.generate import check_context
        from ..run.ranks import launched
        from .measure import BenchOptions, bench

        if launched():
            raise BadOption(
                "devicemap bench measures one process; under torchrun measure the ranks with"
                " `python bench/pipeline.py`, or time `devicemap run --json` (its timings)",
                options=("bench",),
            )
        options = BenchOptions(prompt_tokens=prompt_tokens, new_tokens=new_tokens, runs=runs)
        opened = open_model(model, planning, plan_file=plan_file)
        with session(ctx, planning, *opened, context=options.context) as s:
            check_context(
                prompt_tokens, new_tokens, s.plan.options.context, limit=s.skeleton.max_positions
            )
            vocab = s.skeleton.config.get_text_config(decoder=True).vocab_size
            result = bench(s.load, s.plan, vocab=vocab, options=options)
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
    else:
        render_bench(result, Console(soft_wrap=False, highlight=False))


def render_bench(result: BenchResult, console: Console) -> None:
    """The speeds, then per device the plan's bytes next to the measured peak."""
    from .measure import MEASURES

    o = result.options
    console.print(
        f"[bold]{result.model}[/bold]: load {result.load_s:.2f} s; prefill"
        f" {result.prefill_tok_s:.1f} tok/s ({o.prompt_tokens} tokens); decode"
        f" {result.decode_tok_s:.2f} tok/s ({o.new_tokens} tokens); median of {o.runs} runs,"
        f" planned for context {result.context}",
        soft_wrap=True,
    )
    table = Table(title="memory per device: planned vs peak", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("device")
    for column in ("planned", "weights", "KV", "work", "logits", "staging", "peak"):
        table.add_column(column, justify="right")
    table.add_column("measured")
    for d in result.devices:
        p = d.planned
        sizes = (p["total"], p["weights"], p["kv_cache"], p["workspace"], p["logits"], p["staging"])
        peak = short_size(d.peak) if d.peak is not None else "-"
        table.add_row(str(d.device), *map(short_size, sizes), peak, d.measured)
    console.print(table)
    for label in sorted({d.measured for d in result.devices}):
        console.print(f"  {label}: {MEASURES[label]}", soft_wrap=True)
