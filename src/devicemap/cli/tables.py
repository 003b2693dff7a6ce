"""The plan as tables: bytes per device with a used/free bar, and the blocks each holds."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.table import Table

from ..devices import parse_device

if TYPE_CHECKING:  # the planner imports torch: not at the CLI's start
    from ..plan.planner import Plan


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
    pool = any(u.expert_cache for u in result.devices)  # a column only when there is one
    columns = ("budget", "weights", "KV", "workspace", "logits", "staging")
    for column in (*columns, *(("expert cache",) if pool else ()), "free"):
        table.add_column(column, justify="right")
    table.add_column("used", no_wrap=True)
    for u in result.devices:
        sizes = [u.budget, u.weights, u.kv_cache, u.workspace, u.logits, u.staging]
        sizes += [u.expert_cache] if pool else []
        sizes.append(u.free)
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
    from ..plan.place import summarise

    table = Table(title="blocks per device (execution order)", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("device")
    table.add_column("blocks")
    table.add_column("runs on")
    for usage in result.devices:
        names = [n for n, d in result.device_map.items() if d == usage.device.map_value]
        if not names:
            continue
        runs = sorted({str(parse_device(result.exec_map[n])) for n in names})
        held = summarise(list(result.device_map), names)
        table.add_row(str(usage.device), ", ".join(held), ", ".join(runs))
    return table
