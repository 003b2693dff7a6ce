"""devicemap: run models too big for one device, split across GPUs, CPU RAM and disk.

plan = devicemap.plan("path/to/model", max_memory={0: "16GiB", "cpu": "32GiB"})
model = devicemap.load("path/to/model", plan=plan)   # a transformers model, ready to generate
devicemap.release(model)                            # hooks removed, device memory freed

The package reads top-down by stage; each imports only the stages below it:

    cli/     how people use it: the typer app, run/chat/bench, bench measurements, demo model
    load/    how the weights get there: loader, reader pool, key conversions, progress
    run/     how it executes: dispatch hooks, input mover, offload, page residency, generation
    plan/    where it goes: options, placement, shortfall (what would fit), the Plan
    model/   what the model is: config, checkpoint index, skeleton, memory per block
    devices.py, errors.py   used by every stage

`devicemap.plan` and `devicemap.load` are the functions; their stages' modules are reached
with `from devicemap.plan import planner` or `from devicemap.load.loader import ...`.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when first used: `import devicemap` (and the CLI's start) stays light
    from .devices import Device
    from .errors import DevicemapError, DoesNotFit
    from .load.loader import load
    from .plan.planner import Plan, plan
    from .run.dispatch import release, releasing

__all__ = ["Device", "DevicemapError", "DoesNotFit", "Plan", "load", "plan", "release", "releasing"]
__version__ = "0.1.0"

_WHERE = {
    "Device": ".devices",
    "DevicemapError": ".errors",
    "DoesNotFit": ".errors",
    "load": ".load.loader",
    "Plan": ".plan.planner",
    "plan": ".plan.planner",
    "release": ".run.dispatch",
    "releasing": ".run.dispatch",
}


def __getattr__(name: str) -> Any:
    """The public names, imported on first use (PEP 562): torch and transformers load only
    when something needs them, not for `devicemap --help`."""
    if name not in _WHERE:
        raise AttributeError(f"module 'devicemap' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


class _Facade(types.ModuleType):
    """The package: importing its plan/ or load/ stage (which Python records as an attribute
    of the package) must not hide the functions `plan` and `load` of the same names."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _WHERE and isinstance(value, types.ModuleType):
            return  # the stage stays reachable as sys.modules["devicemap.plan"], by import
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Facade
