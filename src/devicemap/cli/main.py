"""The `devicemap` command line: the typer app, the `plan` command, and `run`, `chat`
and `bench` (commands.py) and `cache` (cache.py) registered on it.

Every devicemap error becomes one line on stderr and exit status 1, never a traceback
(and, with --json, one {"error": ...} object on stdout); Ctrl-C, status 130. A value not
among an option's choices is a usage error: status 2.

Importing this module loads no torch or transformers: each command imports what it needs
when it runs, so `devicemap --help` is quick (tests/test_startup.py, bench/startup.py).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from ..errors import BadOption
from . import cache, commands, serve
from .commands import command_errors
from .options import ModelArg, PlanChoices, model_argument, options_from
from .tables import render_plan
from .version import VersionOpt, with_version

if TYPE_CHECKING:
    from ..run.ranks import Ranks

HELP = {"help_option_names": ["-h", "--help"]}  # every command, the cache group's too

app = typer.Typer(
    help="Plan, load and run models too big for one device, across GPUs, CPU RAM and disk.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings=HELP,
)


@app.callback()
def main(version: VersionOpt = False) -> None:
    """Plan, load and run models too big for one device, across GPUs, CPU RAM and disk."""


# --- plan -----------------------------------------------------------------------


@app.command("plan")
@with_version
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
    ranks: Annotated[
        int | None,
        typer.Option(
            "--ranks",
            metavar="N",
            help="Plan pipeline stages over N ranks (machines or processes), each with the"
            " budgets given here: a what-if for `torchrun`.",
        ),
    ] = None,
    rank_budgets: Annotated[
        str | None,
        typer.Option(
            "--rank-budgets",
            metavar="FILE",
            help='Plan over ranks with their own budgets: a JSON list, [{"0": "24GiB",'
            ' "cpu": "64GiB"}, {"cpu": "128GiB"}].',
        ),
    ] = None,
) -> None:
    """Plan where every part of MODEL goes, counting KV cache, workspace and logits."""
    with command_errors(as_json=as_json):  # Ctrl-C: torch may still be importing
        from .ranked import check_ranks_option, joined

        joined_ranks = joined()
        check_ranks_option(joined_ranks, ranks, rank_budgets)
        if joined_ranks is not None or ranks is not None or rank_budgets is not None:
            if save is not None:
                raise BadOption(
                    "--save writes a plan for one process; a plan over ranks is printed with"
                    " --json (under torchrun the ranks plan together each time)",
                    options=("save",),
                )
            plan_ranks(
                model, planning, joined_ranks, ranks, rank_budgets, as_json=as_json, explain=explain
            )
            return
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


def plan_ranks(
    model: str | None,
    planning: PlanChoices,
    ranks: Ranks | None,
    what_if: int | None,
    budgets_file: str | None,
    *,
    as_json: bool,
    explain: bool,
) -> None:
    """`plan` over several ranks: the joined `ranks` (torchrun: every rank's plan on rank 0,
    its own on the others), or a what-if over `what_if` ranks or those of `budgets_file`."""
    from ..run.ranks import leave
    from .ranked import plan_stages, plan_together, stage_json

    target: str = model_argument(model)
    if ranks is not None:
        from ..model.checkpoint import resolve_model

        source = resolve_model(target, revision=planning.revision)
        stages = plan_together(planning, source, ranks, "plan")[1]
    else:
        stages = plan_stages(planning, target, what_if=what_if, budgets_file=budgets_file)
    rank = 0 if ranks is None else ranks.rank
    if as_json:
        typer.echo(json.dumps(stage_json(stages, rank) if ranks else stages.to_json(), indent=2))
    elif rank == 0:
        console = Console(soft_wrap=False)
        for r, own in enumerate(stages.plans):
            console.print(f"rank {r}:")
            render_plan(own, console)
        typer.echo(stages.explain() if explain else "\n".join(stages.lines))
    if ranks is not None:
        leave()


app.command("run")(with_version(commands.run_command))
app.command("chat")(with_version(commands.chat_command))
app.command("bench")(with_version(commands.bench_command))
app.command("serve")(with_version(serve.serve_command))
app.add_typer(cache.app, name="cache")
