"""Every error devicemap raises on bad input lives here.

Each message says what happened, names the thing (key, device, file, size) and
says what to do. Where several things are wrong, the error lists all of them.
"""

from __future__ import annotations


class DevicemapError(Exception):
    """Base class: catch this to catch every devicemap error."""


# --- devices and budgets ---------------------------------------------------


class DeviceError(DevicemapError):
    """A device or a memory budget could not be understood."""


class BadSize(DeviceError, ValueError):
    """A memory size such as "10 GiBs", "-1GB" or "150%"."""


class UnknownDevice(DeviceError, ValueError):
    """A device name that is not 0, "cuda:N", "cpu", "disk" or "mps"."""


class DuplicateDevice(DeviceError, ValueError):
    """The same device given twice (e.g. 0 and "cuda:0")."""


class DeviceNotPresent(DeviceError, RuntimeError):
    """A plan uses a device this machine does not have (a what-if plan, or one made elsewhere)."""


# --- model and checkpoint ---------------------------------------------------


class ModelNotFound(DevicemapError, FileNotFoundError):
    """A path that does not exist, or a hub id that is not in the local cache."""


class ConfigError(DevicemapError, ValueError):
    """A config.json that cannot be turned into a model (no `architectures`, ...)."""


class RemoteCodeNotTrusted(ConfigError):
    """A model that ships its own code (auto_map), loaded without trust_remote_code."""


class CheckpointError(DevicemapError):
    """A checkpoint that is unreadable, truncated or incomplete."""


class CorruptCheckpoint(CheckpointError, ValueError):
    """A safetensors header that cannot be parsed, or data past the end of a file."""


class MissingShard(CheckpointError, FileNotFoundError):
    """A shard named in the index file is not on disk."""


class KeyMismatch(CheckpointError, KeyError):
    """Missing, unexpected or shape-mismatched tensors, all reported at once."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


# --- planning ---------------------------------------------------------------


class PlanError(DevicemapError):
    """A plan cannot be made or used."""


class DoesNotFit(PlanError):
    """The model and its runtime memory do not fit the budgets; says by how much."""

    def __init__(self, message: str, *, shortfall: int = 0, suggestions: tuple[str, ...] = ()):
        super().__init__(message)
        self.shortfall = shortfall  # bytes
        self.suggestions = suggestions


class PinError(PlanError, ValueError):
    """A pin names a module that does not exist, or a device without a budget."""


class PlanMismatch(PlanError):
    """A saved plan belongs to another model, dtype or format version."""


# --- loading and running ----------------------------------------------------


class LoadError(DevicemapError):
    """Weights could not be placed where the plan says."""


class DeviceOutOfMemory(LoadError, MemoryError):
    """A device ran out of memory while loading; says which, how much, what would fit."""


class OffloadError(LoadError, OSError):
    """The offload directory is unwritable or full; nothing half-written is kept."""


# --- generation -------------------------------------------------------------


class BadOption(DevicemapError, ValueError):
    """An option out of its valid range (temperature -1, top_p 2, ...); names each and its range."""

    def __init__(self, message: str, *, options: tuple[str, ...] = ()):
        super().__init__(message)
        self.options = options  # the names of all the bad options


class BadImage(DevicemapError, ValueError):
    """An image file that is missing or does not decode; names the file."""


class ContextTooLong(PlanError, ValueError):
    """A prompt (plus the tokens to generate) longer than the context the plan reserved."""


class CheckpointChanged(LoadError, RuntimeError):
    """A checkpoint file a running model reads from was rewritten, truncated or replaced."""


class CacheError(LoadError, OSError):
    """The converted-tensor cache cannot be written or read safely (names the path and the fix)."""


class TemplateError(DevicemapError, ValueError):
    """The model's chat template failed on these messages (names the cause and the fix)."""


class GenerationFailed(DevicemapError, RuntimeError):
    """The model itself raised while generating (a config value or input it cannot take);
    the original exception is the __cause__."""


# --- ranks (pipeline stages over torch.distributed) ------------------------


class RankError(DevicemapError):
    """Several ranks (torchrun processes) could not work together."""


class RankMismatch(RankError, ValueError):
    """Ranks started with different checkpoints, options or devicemap versions; names them."""


class RankFailed(RankError, RuntimeError):
    """Another rank died, hung or failed: every rank stops within a bounded timeout."""
