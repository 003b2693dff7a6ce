"""The `devicemap` command line: one function per command, shared option helpers.

Every devicemap error becomes one line on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Annotated, Any, cast, get_type_hints

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from ..devices import DeviceLike, parse_device
from ..errors import BadSize, DevicemapError, DuplicateDevice, PinError
from ..model.skeleton import Skeleton
from ..plan.planner import Logits, OffloadExec, Plan, Strategy, compress_names, plan

app = typer.Typer(
    help="Plan, load and run models too big for one device, across GPUs, CPU RAM and disk.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main() -> None:
    """Plan, load and run models too big for one device, across GPUs, CPU RAM and disk."""


# --- shared options -------------------------------------------------------------

ModelArg = Annotated[
    str | None,
    typer.Argument(
        help="Model directory, config.json, weights file or hub id in the local cache."
        " Default: the demo model, SmolLM2-135M-Instruct (converted once, cached).",
        show_default=False,
    ),
]
MaxMemoryOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--max-memory",
        "-m",
        help="DEVICE=SIZE, repeatable (0=40GiB, cuda:1=24GB, cpu=64GiB, disk=200GiB, 0=85%)."
        " Devices this machine lacks are fine: what-if planning. Default: what is free now.",
    ),
]
GpusOpt = Annotated[
    str | None,
    typer.Option("--gpus", help="How many GPUs to use (2) or which (0,1). Default: all."),
]
ContextOpt = Annotated[
    int | None,
    typer.Option("--context", "-c", help="Tokens per sequence (prompt + reply). Default 4096."),
]
BatchOpt = Annotated[int, typer.Option("--batch", "-b", help="Sequences generated together.")]
DtypeOpt = Annotated[
    str | None,
    typer.Option("--dtype", help="Weights dtype: bfloat16, float16, float32. Default: config's."),
]
StrategyOpt = Annotated[
    str,
    typer.Option("--strategy", help="sequential, balanced or balanced_low_0 (GPU 0 kept light)."),
]
PinOpt = Annotated[
    list[str] | None,
    typer.Option("--pin", help="MODULE=DEVICE, repeatable: lm_head=0, model.vision_tower=cuda:0."),
]
OffloadExecOpt = Annotated[
    str,
    typer.Option("--offload-exec", help="Where cpu/disk-stored blocks run: gpu (first) or cpu."),
]
LogitsOpt = Annotated[
    str,
    typer.Option("--logits", help="Logits kept per prefill: last (generate) or all (forward)."),
]


@dataclass(frozen=True)
class PlanChoices:
    """The planning options as typed, declared once for `plan`, `run`, `chat` and `bench`.

    Each field's annotation is its typer option and its default the option's default;
    `options_from(planning=PlanChoices)` puts them in a command's signature.
    """

    max_memory: MaxMemoryOpt = None
    gpus: GpusOpt = None
    context: ContextOpt = None
    batch: BatchOpt = 1
    dtype: DtypeOpt = None
    strategy: StrategyOpt = "balanced"
    pin: PinOpt = None
    offload_exec: OffloadExecOpt = "gpu"
    logits: LogitsOpt = "last"

    def make_plan(self, model: str | Skeleton, *, context: int | None = None) -> Plan:
        """plan() with these options parsed; `context` is used when --context was not given."""
        return plan(
            model,
            max_memory=parse_max_memory(self.max_memory),
            gpus=parse_gpus(self.gpus),
            context=context if self.context is None else self.context,
            batch=self.batch,
            dtype=None if isinstance(model, Skeleton) else self.dtype,  # a skeleton has its own
            strategy=cast(Strategy, self.strategy),
            pins=parse_pin_options(self.pin),
            offload_exec=cast(OffloadExec, self.offload_exec),
            logits=cast(Logits, self.logits),
        )


# the planning options' parameter names; a saved plan (`run --plan`) replaces all of them
PLANNING = tuple(f.name for f in fields(PlanChoices))

Command = Callable[..., None]


def options_from(**groups: type[Any]) -> Callable[[Command], Command]:
    """Decorator: a command parameter NAME=Group becomes Group's fields, one option each.

    Typer reads options from the signature, so the decorated command shows each field (its
    Annotated option and default) where NAME stood; a call packs them back into Group(...)
    and passes that as NAME. A dataclass of options thus serves every command that takes it.
    """

    def expand(command: Command) -> Command:
        signature = inspect.signature(command, eval_str=True)
        parameters = [
            option
            for p in signature.parameters.values()
            for option in (group_parameters(groups[p.name], p) if p.name in groups else [p])
        ]

        @functools.wraps(command)
        def call(**options: Any) -> None:
            for name, group in groups.items():
                options[name] = group(**{f.name: options.pop(f.name) for f in fields(group)})
            command(**options)

        call.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        call.__annotations__ = {p.name: p.annotation for p in parameters}  # typer reads both
        return call

    return expand


def group_parameters(group: type[Any], replaced: inspect.Parameter) -> list[inspect.Parameter]:
    """A dataclass's fields as parameters of `replaced`'s kind, with Annotated types, defaults."""
    hints = get_type_hints(group, include_extras=True)  # keeps typer's Annotated metadata
    return [
        inspect.Parameter(f.name, replaced.kind, default=f.default, annotation=hints[f.name])
        for f in fields(group)
    ]


def model_argument(model: str | None) -> str:
    """The one place that turns the MODEL argument into a model reference (demo default: here)."""
    if model is None:
        from .demo import demo_model_dir  # converts the demo model on first use (~20 s)

        return str(demo_model_dir())
    return model


def parse_assignments(
    items: Sequence[str] | None, *, option: str, example: str
) -> list[tuple[str, str]]:
    """["0=40GiB", "cpu=64GiB"] -> [("0", "40GiB"), ("cpu", "64GiB")]; all bad items at once."""
    pairs, bad = [], []
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            bad.append(repr(item))
        else:
            pairs.append((key.strip(), value.strip()))
    if bad:
        raise ValueError(f"{option} {', '.join(bad)}: write KEY=VALUE, like {option} {example}")
    return pairs


def parse_max_memory(items: Sequence[str] | None) -> dict[DeviceLike, str] | None:
    """--max-memory items -> {device: size}, or None (use what is free now) when none given."""
    try:
        pairs = parse_assignments(items, option="--max-memory", example="0=40GiB")
    except ValueError as exc:
        raise BadSize(str(exc)) from None
    seen: dict[str, str] = {}
    for key, value in pairs:
        if key.lower() in seen:
            raise DuplicateDevice(
                f"--max-memory gives device {key!r} twice ({seen[key.lower()]} and {value});"
                " give each device once"
            )
        seen[key.lower()] = value
    return dict(pairs) if pairs else None


def parse_pin_options(items: Sequence[str] | None) -> dict[str, DeviceLike]:
    """--pin items -> {module prefix: device}."""
    try:
        pairs = parse_assignments(items, option="--pin", example="lm_head=0")
    except ValueError as exc:
        raise PinError(str(exc)) from None
    twice = sorted({k for k, _ in pairs if sum(1 for other, _ in pairs if other == k) > 1})
    if twice:
        raise PinError(f"--pin names {', '.join(twice)} more than once; pin each module once")
    return dict(pairs)


def parse_gpus(value: str | None) -> int | list[DeviceLike] | None:
    """--gpus "2" -> 2 (the first two); "0,1" -> [0, 1]; None -> all."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return int(value)
    return [item.strip() for item in value.split(",") if item.strip()]


@contextmanager
def reporting_errors() -> Iterator[None]:
    """Turn a DevicemapError into one line on stderr and exit status 1."""
    try:
        yield
    except DevicemapError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


# --- plan -----------------------------------------------------------------------


@app.command("plan")
@options_from(planning=PlanChoices)
def plan_command(
    model: ModelArg = None,
    *,
    planning: PlanChoices,
    save: Annotated[
        str | None, typer.Option("--save", help="Write the plan as JSON to FILE.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print only the plan as one JSON object.")
    ] = False,
    explain: Annotated[
        bool, typer.Option("--explain", help="Say why each device holds what it holds.")
    ] = False,
) -> None:
    """Plan where every part of MODEL goes, counting KV cache, workspace and logits."""
    with reporting_errors():
        result = planning.make_plan(model_argument(model))
        if save is not None:
            result.save(save)
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
    else:
        render_plan(result, Console(soft_wrap=False))
        if explain:
            typer.echo(result.explain())
    if save is not None:
        typer.echo(f"plan saved to {save}", err=True)


def render_plan(result: Plan, console: Console) -> None:
    """A table of bytes per device with a used/free bar, then the blocks each device holds."""
    opts = result.options
    console.print(
        f"[bold]{result.model}[/bold]: {str(result.dtype).removeprefix('torch.')}, context"
        f" {opts.context} x batch {opts.batch}, {opts.strategy}; longest context that fits:"
        f" {result.max_context}",
        highlight=False,
    )
    console.print(usage_table(result))
    console.print(blocks_table(result))


def usage_table(result: Plan) -> Table:
    table = Table(title="memory per device", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0))
    table.add_column("device")
    for column in ("budget", "weights", "KV", "workspace", "logits", "staging", "free"):
        table.add_column(column, justify="right")
    table.add_column("used", no_wrap=True)
    for u in result.devices:
        sizes = (u.budget, u.weights, u.kv_cache, u.workspace, u.logits, u.staging, u.free)
        table.add_row(str(u.device), *map(short_size, sizes), usage_bar(u.used, u.budget))
    return table


def short_size(nbytes: int) -> str:
    """'40.0G', '736M', '501K', '12B', '0': three significant digits, binary units."""
    value = float(nbytes)
    for unit in ("B", "K", "M", "G", "T"):
        if abs(value) < 1000 or unit == "T":
            break
        value /= 1024
    if value == 0:
        return "0"
    return f"{value:.0f}{unit}" if unit == "B" or abs(value) >= 100 else f"{value:.3g}{unit}"


def usage_bar(used: int, budget: int, width: int = 8) -> str:
    """'███████░░░  67%': the used share of the budget."""
    share = used / budget if budget else (0.0 if used == 0 else 1.0)
    filled = min(width, round(share * width))
    return f"{'█' * filled}{'░' * (width - filled)} {share:4.0%}"


def blocks_table(result: Plan) -> Table:
    table = Table(title="blocks per device (execution order)", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("device")
    table.add_column("blocks")
    table.add_column("runs on")
    for usage in result.devices:
        names = [n for n, d in result.device_map.items() if d == usage.device.map_value]
        if not names:
            continue
        runs = sorted({str(parse_device(result.exec_map[n])) for n in names})
        table.add_row(str(usage.device), ", ".join(compress_names(names)), ", ".join(runs))
    return table


from . import commands as _commands  # noqa: E402, F401  (registers run, chat and bench on app)
