"""devicemap: run models too big for one device, split across GPUs, CPU RAM and disk."""

from .devices import Device
from .errors import DevicemapError, DoesNotFit
from .plan import Plan, plan

__all__ = ["Device", "DevicemapError", "DoesNotFit", "Plan", "plan"]
__version__ = "0.1.0"
