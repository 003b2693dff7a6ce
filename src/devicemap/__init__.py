"""devicemap: run models too big for one device, split across GPUs, CPU RAM and disk.

plan = devicemap.plan("path/to/model", max_memory={0: "16GiB", "cpu": "32GiB"})
model = devicemap.load("path/to/model", plan=plan)   # a transformers model, ready to generate
devicemap.release(model)                            # hooks removed, device memory freed
"""

from .devices import Device
from .dispatch import release, releasing
from .errors import DevicemapError, DoesNotFit
from .load import load
from .plan import Plan, plan

__all__ = ["Device", "DevicemapError", "DoesNotFit", "Plan", "load", "plan", "release", "releasing"]
__version__ = "0.1.0"
