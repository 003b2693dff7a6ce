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

from .devices import Device
from .errors import DevicemapError, DoesNotFit
from .load.loader import load
from .plan.planner import Plan, plan
from .run.dispatch import release, releasing

__all__ = ["Device", "DevicemapError", "DoesNotFit", "Plan", "load", "plan", "release", "releasing"]
__version__ = "0.1.0"
