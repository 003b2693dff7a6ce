"""The command line's shared options, declared once: typer option types, the planning
options as one dataclass (`PlanChoices`), `options_from` to put a dataclass's fields in a
command's signature, parsers for DEVICE=SIZE style items, and the error reporting.

Every devicemap error becomes one line on stderr and exit status 1, never a traceback;
with --json, also one {"error": {"type", "message"}} object on stdout. A value that is not
one of an option's choices (--strategy, --dtype, ...) is a usage error: exit status 2.

Nothing here imports torch or transformers (the planner is imported when a plan is made):
`devicemap --help` starts in a fraction of a second.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Annotated, Any, get_args, get_type_hints

import typer

from ..errors import BadSize, DevicemapError, DuplicateDevice, PinError
from ..plan.options import Dtype, Logits, OffloadExec, Strategy

if TYPE_CHECKING:  # annotations only: the planner (torch, transformers) loads when used
    from ..devices import DeviceLike
    from ..model.skeleton import Skeleton
    from ..plan.options import PlanOptions
    from ..plan.planner import Plan, RankBudgets

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
# other spellings model/config.py takes for the --dtype choices (any case, "torch." prefix)
DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float": "float32",
}


def dtype_choice(value: str) -> str:
    """--dtype's value as one of its choices: "BF16" -> "bfloat16"; a usage error (exit 2)
    naming the choices for anything else."""
    name = value.strip().lower().removeprefix("torch.")
    name = DTYPE_ALIASES.get(name, name)
    if name not in get_args(Dtype):
        choices = ", ".join(repr(c) for c in get_args(Dtype))
        raise typer.BadParameter(f"{value!r} is not one of {choices}.")
    return name


DtypeOpt = Annotated[
    Dtype,  # the Literal makes --help list the choices; dtype_choice also takes the aliases
    typer.Option(
        "--dtype",
        parser=dtype_choice,
        help="Weights dtype; auto: the checkpoint's (config.json's dtype). bf16, fp16, fp32"
        " are taken too.",
    ),
]
StrategyOpt = Annotated[
    Strategy,
    typer.Option(
        "--strategy",
        help="How blocks spread over the GPUs: sequential fills each in turn, balanced shares"
        " them by budget, balanced_low_0 keeps GPU 0 light.",
    ),
]
PinOpt = Annotated[
    list[str] | None,
    typer.Option("--pin", help="MODULE=DEVICE, repeatable: lm_head=0, model.vision_tower=cuda:0."),
]
OffloadExecOpt = Annotated[
    OffloadExec,
    typer.Option("--offload-exec", help="Where cpu/disk-stored blocks run: gpu (first) or cpu."),
]
LogitsOpt = Annotated[
    Logits,
    typer.Option("--logits", help="Logits kept per prefill: last (generate) or all (forward)."),
]
ImagesOpt = Annotated[
    int | None,
    typer.Option(
        "--images",
        help="Images per prompt the vision tower's workspace is planned for."
        " Default: 1 for a vision-language model (run: the --image files given), else 0.",
    ),
]
ExpertCacheOpt = Annotated[
    int,
    typer.Option(
        "--expert-cache",
        min=0,
        help="Slots per GPU for routed experts stored in RAM or on disk, copied in"
        " least-recently-used and computed on the GPU (MoE models, CUDA). 0: none, experts"
        " off the GPUs are computed by the CPU.",
    ),
]
PageCacheOpt = Annotated[
    str | None,
    typer.Option(
        "--page-cache",
        help="How much of the disk tier may stay in the page cache (16GiB, 12GB); disk blocks"
        " beyond it are streamed through, read each token. Default: this machine's free RAM"
        " (cgroup limits included) beyond what the plan puts on the cpu, less a tenth.",
    ),
]
GpuMarginOpt = Annotated[
    str | None,
    typer.Option(
        "--gpu-margin",
        help="Memory each CUDA GPU keeps free for the CUDA context, kernels and allocator"
        " when its budget is measured (free now, a percentage, --gpu-memory-fraction):"
        " 2GiB, or 10% of the GPU's memory; 0 keeps none. Default: 512 MiB + 5% of the"
        " GPU's memory. Sizes such as --max-memory 0=20GiB are taken as they are.",
    ),
]
GpuFractionOpt = Annotated[
    float | None,
    typer.Option(
        "--gpu-memory-fraction",
        help="Share of each GPU's free memory to budget, above 0 and at most 1 (0.85);"
        " --max-memory DEVICE=SIZE wins for that device. Default: all of it, less"
        " --gpu-margin.",
    ),
]
DeviceMapOpt = Annotated[
    str | None,
    typer.Option(
        "--device-map",
        help="A JSON file of {module: device} (an accelerate/transformers device_map:"
        ' {"model.layers.0": 0, "lm_head": "cpu", ...}), taken as --pin for each entry;'
        " entries inside a block are widened to the whole block, with a warning.",
    ),
]
RevisionOpt = Annotated[
    str | None,
    typer.Option(
        "--revision",
        help="For a hub id: the branch, tag or commit in the local Hugging Face cache"
        " (`hf download REPO --revision REV` puts it there). Default: main.",
    ),
]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Run the model's own code (auto_map: its modeling_*.py, tokenizer, processor)."
        " Only for models whose code you trust.",
    ),
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
    dtype: DtypeOpt = "auto"
    strategy: StrategyOpt = "balanced"
    pin: PinOpt = None
    offload_exec: OffloadExecOpt = "gpu"
    logits: LogitsOpt = "last"
    images: ImagesOpt = None
    expert_cache: ExpertCacheOpt = 0
    page_cache: PageCacheOpt = None
    gpu_memory_fraction: GpuFractionOpt = None
    gpu_margin: GpuMarginOpt = None
    device_map: DeviceMapOpt = None
    revision: RevisionOpt = None
    trust_remote_code: TrustOpt = False

    def make_plan(
        self, model: str | Skeleton, *, context: int | None = None, images: int | None = None
    ) -> Plan:
        """plan() with these options parsed; `context` and `images` are used when --context
        and --images were not given."""
        from ..plan.planner import plan

        chosen = plan(**self._arguments(model, context, images))
        if self.device_map is not None:
            warn_widened(read_device_map(self.device_map), chosen)
        return chosen

    def inputs(
        self, model: str | Skeleton, *, context: int | None = None, images: int | None = None
    ) -> tuple[Skeleton, RankBudgets, PlanOptions]:
        """What make_plan plans from: the skeleton, this machine's budgets, the options (for
        a plan over several ranks, whose budgets are exchanged first)."""
        from ..plan.planner import plan_inputs

        return plan_inputs(**self._arguments(model, context, images))

    def _arguments(
        self, model: str | Skeleton, context: int | None, images: int | None
    ) -> dict[str, Any]:
        from ..model.checkpoint import resolve_model
        from ..model.skeleton import Skeleton

        pins = pins_with_device_map(parse_pin_options(self.pin), self.device_map)
        # a hub id at --revision, a GGUF file converted once
        target = resolve_model(model, revision=self.revision) if isinstance(model, str) else model
        return dict(
            model=target,
            max_memory=parse_max_memory(self.max_memory),
            gpus=parse_gpus(self.gpus),
            context=context if self.context is None else self.context,
            batch=self.batch,
            dtype=None if isinstance(model, Skeleton) else self.dtype,  # a skeleton has its own
            strategy=self.strategy,
            pins=pins,
            offload_exec=self.offload_exec,
            logits=self.logits,
            trust_remote_code=self.trust_remote_code,
            images=images if self.images is None else self.images,
            expert_cache=self.expert_cache,
            page_cache=self.page_cache,
            gpu_memory_fraction=self.gpu_memory_fraction,
            gpu_margin=self.gpu_margin,
        )


def read_json_option(path: str, bad: Callable[[str], DevicemapError]) -> Any:
    """The JSON in the file an option names (16 MiB at most read); `bad(why)` is raised
    when the file is missing or is not JSON."""
    try:
        with open(path, "rb") as file:
            return json.loads(file.read(16 << 20))
    except FileNotFoundError:
        raise bad("no such file") from None
    except (OSError, ValueError, RecursionError) as error:
        raise bad(f"not readable JSON ({error})") from None


def read_device_map(path: str) -> dict[str, DeviceLike]:
    """The {module: device} of a --device-map JSON file; BadOption naming the file."""
    from ..errors import BadOption

    def bad(why: str) -> BadOption:
        return BadOption(
            f"--device-map {path}: {why}; give a JSON object of module names to devices, like"
            ' {"model.layers.0": 0, "lm_head": "cpu"}',
            options=("device_map",),
        )

    data = read_json_option(path, bad)
    if not isinstance(data, dict) or not data:
        raise bad("not a non-empty JSON object")
    wrong = [k for k, v in data.items() if isinstance(v, bool) or not isinstance(v, (int, str))]
    if wrong:
        raise bad(f"entries {', '.join(map(repr, wrong[:5]))} name no device")
    return {str(k): v for k, v in data.items()}


def pins_with_device_map(
    pins: dict[str, DeviceLike], device_map: str | None
) -> dict[str, DeviceLike]:
    """--pin entries plus the --device-map file's (the same module in both: PinError)."""
    if device_map is None:
        return pins
    entries = read_device_map(device_map)
    twice = sorted(set(entries) & set(pins))
    if twice:
        raise PinError(
            f"{', '.join(twice)} in both --pin and --device-map {device_map}: give each once"
        )
    if "" in entries:  # accelerate's {"": 0}: the whole model on one device
        whole = entries.pop("")
        if entries:
            raise PinError(
                f'--device-map {device_map} maps "" (the whole model) and other modules too'
            )
        return {**pins, "": whole}
    return {**pins, **entries}


def warn_widened(entries: dict[str, DeviceLike], chosen: Plan) -> None:
    """One warning line listing the --device-map entries inside a block: the plan places
    whole blocks (a block's parts never run apart), so each took its block."""
    blocks = list(chosen.device_map)
    widened = []
    for module in entries:
        if not module or module in chosen.device_map:
            continue
        if any(b.startswith(module + ".") for b in blocks):
            continue  # a parent of whole blocks: they all take its device
        holder = next((b for b in blocks if module.startswith(b + ".")), None)
        if holder is not None:
            widened.append(f"{module} -> {holder}")
    if widened:
        typer.echo(
            "warning: --device-map entries inside a block were widened to the whole block"
            f" (devicemap places whole blocks): {', '.join(widened)}",
            err=True,
        )


# the planning options' parameter names
PLANNING = tuple(f.name for f in fields(PlanChoices))
# those a saved plan (`run --plan`) replaces: building the model may still need its own code
REPLANNING = tuple(name for name in PLANNING if name not in ("trust_remote_code", "revision"))

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
def reporting_errors(*, as_json: bool = False) -> Iterator[None]:
    """Turn a DevicemapError into one line on stderr and exit status 1; with `as_json` (the
    command's --json) also into one object on stdout: {"error": {"type": ..., "message": ...}}."""
    try:
        yield
    except DevicemapError as exc:
        typer.echo(f"error: {exc}", err=True)
        if as_json:
            error = {"type": type(exc).__name__, "message": str(exc)}
            typer.echo(json.dumps({"error": error}, indent=2))
        raise typer.Exit(1) from None
