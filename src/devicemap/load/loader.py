"""Stream every tensor from the checkpoint straight to the device the plan stores it on.

GPU and CPU tensors are read from the file into their final buffer one at a time
(host RAM: the CPU-resident weights plus a few tensors). Disk tensors are the
checkpoint itself, memory-mapped, when dtype and layout allow; otherwise they come
from one converted safetensors cache, written once per (model, dtype, tensors).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import mmap
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..devices import (
    CPU,
    DISK,
    Device,
    cpu_memory,
    format_size,
    inventory,
    parse_device,
    present,
)
from ..errors import CheckpointError, DeviceNotPresent, DeviceOutOfMemory, LoadError, PlanMismatch
from ..model import checkpoint
from ..model.checkpoint import CheckpointIndex, TensorInfo
from ..model.init import initialize
from ..model.skeleton import Skeleton, build_skeleton, is_experts
from ..plan.planner import Plan
from ..run.experts import EXPERTS_ATTR, ExpertWeights
from .cache import ALIGN, Source, cache_layout, default_dir, source_identity, sweep
from .convert import KeyMap, Recipe, map_checkpoint, raise_on_mismatch, run_recipe
from .experts import Pieces, expert_pieces, experts_recipes, leaf
from .progress import Meter, progress_bar
from .reader import ReadPool

_SKELETON_OPTIONS = ("no_split", "trust_remote_code")  # options that shape the model itself


def load(
    model: Any,
    plan: Plan | None = None,
    *,
    offload_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    **plan_options: Any,
) -> Any:
    """The transformers model with every weight where `plan` puts it, ready for `generate`.

    `model` is a path, config.json, cached hub id or Skeleton. Without a plan, plans first
    with `plan_options` (the options of `devicemap.plan`). Disk tensors that need another
    dtype or layout come from one converted cache under `offload_dir` (default
    `$DEVICEMAP_CACHE/offload`, else `~/.cache/devicemap/offload`).
    """
    if plan is not None and set(plan_options) - set(_SKELETON_OPTIONS):
        extra = ", ".join(sorted(set(plan_options) - set(_SKELETON_OPTIONS)))
        raise TypeError(f"load() got a plan and planning options ({extra}); give one or the other")
    skeleton = _skeleton(model, plan, plan_options)
    if plan is None:
        from ..plan.planner import plan as make

        plan = make(skeleton, **plan_options)
    plan.check(skeleton)  # PlanMismatch: a plan made for another model or dtype
    index = checkpoint.read_index(skeleton.source)  # CorruptCheckpoint before any allocation
    return place(skeleton, plan, index, offload_dir=offload_dir, progress=progress)


def _skeleton(model: Any, plan: Plan | None, options: Mapping[str, Any]) -> Skeleton:
    if isinstance(model, Skeleton):
        return model
    dtype = plan.dtype if plan is not None else options.get("dtype")
    kwargs = {k: options[k] for k in _SKELETON_OPTIONS if k in options}
    return build_skeleton(model, dtype=dtype, **kwargs)


def place(
    skeleton: Skeleton,
    plan: Plan,
    index: CheckpointIndex,
    *,
    offload_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> Any:
    """Fill the skeleton's meta model from `index` as `plan` says, tie, dispatch, return it.

    On any error every tensor placed so far is put back on meta (nothing stays allocated).
    """
    model = skeleton.model
    if any(not t.is_meta for t in model.parameters()):
        raise LoadError(
            f"the skeleton of {skeleton.source.name} was loaded already (its model is the"
            " loaded model); build a new one with build_skeleton to load again"
        )
    if skeleton.dtype != plan.dtype:
        raise PlanMismatch(
            f"the plan for {plan.model} is for {plan.dtype} but the model was built for"
            f" {skeleton.dtype}; build it with build_skeleton(..., dtype={plan.dtype})"
        )
    _check_present(plan)
    _refuse_quantized(skeleton)
    where = _placement(model, plan)
    keys = map_checkpoint(model, index)
    raise_on_mismatch(keys, skeleton.source.name)  # the whole checkpoint, on every rank
    keys = _this_rank(keys, where)
    job = _Job(model, plan, keys, where)
    job.experts = _expert_sources(job)
    try:
        with progress_bar(_totals(job), progress) as meter, job.reads:  # no read outlives the pool
            cached = _offload(job, _offload_dir(offload_dir), skeleton, meter)
            for recipe in keys.recipes:
                if not job.handled(recipe):
                    _place_recipe(job, recipe, cached, meter)
            for name, pieces in job.experts.items():
                _place_experts(job, name, pieces, meter)
            job.reads.wait()
        _finish(job, skeleton)
    except BaseException:
        job.undo()
        raise
    return model


def _refuse_quantized(skeleton: Skeleton) -> None:
    """A quantized checkpoint (GPTQ, AWQ, bitsandbytes, fp8 ...) holds tensors devicemap
    cannot read as the model's weights yet: say so, instead of a key mismatch."""
    quantization = getattr(skeleton.config, "quantization_config", None)
    if not quantization:
        return
    get = (
        quantization.get
        if isinstance(quantization, dict)
        else functools.partial(getattr, quantization)
    )
    method = get("quant_method", None) or "quantized"
    raise CheckpointError(
        f"{skeleton.source.name} is a {method} checkpoint (quantization_config in its"
        " config.json): devicemap loads unquantized weights only (bf16/fp16/fp32), and plans"
        " the model at that size; use the model's unquantized release, or a GGUF file"
        " (converted once, de-quantised)"
    )


@dataclass(frozen=True)
class _Where:
    storage: Device  # where the tensor is kept
    execute: Device  # where its block runs


def _placement(model: torch.nn.Module, plan: Plan) -> dict[str, _Where]:
    """Each state_dict key and non-persistent buffer -> its block's devices; PlanMismatch if off."""
    names = {name for name, _ in model.named_modules()} | set(model.state_dict())
    names |= {name for name, _ in model.named_buffers()}  # loose non-persistent buffers
    unknown = sorted(k for k in plan.device_map if k and k not in names)
    keys = [*model.state_dict(), *(name for name, _ in _non_persistent(model))]
    remote = plan.stage.remote if plan.stage is not None else {}
    where, uncovered = {}, []
    for key in keys:
        block = _block_of(key, plan.device_map)
        if block is None:
            if _block_of(key, remote) is None:  # held by another rank: stays on meta here
                uncovered.append(key)
            continue
        storage = parse_device(plan.device_map[block])
        default = CPU if storage == DISK else storage
        where[key] = _Where(storage, parse_device(plan.exec_map.get(block, default.map_value)))
    if unknown or uncovered:
        raise PlanMismatch(
            f"the plan for {plan.model} does not fit this model: "
            + (f"it places modules the model lacks ({', '.join(unknown[:8])}); " if unknown else "")
            + (f"it leaves {', '.join(uncovered[:8])} unplaced; " if uncovered else "")
            + "make a new plan for this model with devicemap.plan(model, ...)"
        )
    return where


def _this_rank(keys: KeyMap, where: Mapping[str, _Where]) -> KeyMap:
    """The recipes of the tensors this process places (all but other ranks' stages)."""
    recipes = tuple(r for r in keys.recipes if all(t in where for t in r.targets))
    return dataclasses.replace(keys, recipes=recipes)


def _check_present(plan: Plan) -> None:
    """DeviceNotPresent before any allocation if the plan uses a device this machine lacks."""
    used = {parse_device(v) for v in [*plan.device_map.values(), *plan.exec_map.values()]}
    missing = sorted((d for d in used if not present(d)), key=lambda d: d.sort_key)
    if not missing:
        return
    gpus = ", ".join(str(d) for d in inventory().gpus)
    here = f"{gpus}, cpu and disk" if gpus else "cpu and disk, no GPU"
    raise DeviceNotPresent(
        f"the plan for {plan.model} uses {', '.join(map(str, missing))}, which this machine"
        f" does not have (it has {here}). A what-if plan or one made"
        " on another machine cannot be loaded here: plan again on this machine with"
        " devicemap.plan(model, ...), or load without a plan"
    )


def _block_of(key: str, device_map: Mapping[str, Any]) -> str | None:
    """The longest device-map prefix that covers `key` ("" covers everything)."""
    parts = key.split(".")
    for end in range(len(parts), -1, -1):
        prefix = ".".join(parts[:end])
        if prefix in device_map:
            return prefix
    return None


def _non_persistent(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    persistent = set(model.state_dict())
    for name, buffer in model.named_buffers():
        if name not in persistent:
            yield name, buffer


@dataclass
class _Job:
    """One load in progress: what goes where, and what was there before (to undo on error)."""

    model: torch.nn.Module
    plan: Plan
    keys: KeyMap
    where: dict[str, _Where]
    loaded: dict[Device, int] = field(default_factory=dict)  # bytes placed per storage device
    reads: ReadPool = field(default_factory=ReadPool)
    reader: _Reader = field(init=False)
    before: list[tuple[dict[str, Any], str, Any]] = field(default_factory=list)
    maps: dict[Path, mmap.mmap] = field(default_factory=dict)  # private maps, see private_map
    # experts modules kept as per-expert checkpoint tensors: name -> {target leaf: pieces}
    experts: dict[str, dict[str, Pieces]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.reader = _Reader(self.reads)
        for module in self.model.modules():  # references only: cheap, and undo restores ties too
            for table in (module._parameters, module._buffers):
                self.before += [(table, name, value) for name, value in table.items()]

    def like(self, key: str) -> torch.Tensor:
        """The tensor the model holds under `key` now (meta until placed)."""
        path, _, name = key.rpartition(".")
        module = self.model.get_submodule(path)
        tensor = module._parameters.get(name, module._buffers.get(name))
        assert tensor is not None, key
        return tensor

    def dtype(self, key: str) -> torch.dtype:
        """The dtype transformers gives `key`: the skeleton is built at the plan's dtype, with
        keep-in-fp32 modules in fp32 and integer buffers as they are."""
        return self.like(key).dtype

    def nbytes(self, key: str) -> int:
        return self.like(key).numel() * self.dtype(key).itemsize

    def set(self, key: str, tensor: torch.Tensor) -> None:
        """Replace the meta tensor `key` with `tensor` (a Parameter for parameters)."""
        path, _, name = key.rpartition(".")
        module = self.model.get_submodule(path)
        old = module._parameters.get(name)
        if old is not None:  # requires_grad as from_pretrained leaves it
            module._parameters[name] = torch.nn.Parameter(tensor, requires_grad=old.requires_grad)
        else:
            module._buffers[name] = tensor
        storage = self.where[key].storage
        self.loaded[storage] = self.loaded.get(storage, 0) + tensor.nbytes

    @functools.cached_property
    def streams_disk(self) -> bool:
        """Whether the plan keeps weights on disk.

        Then cpu-tier weights are copied into ordinary memory: as file pages they would
        share the page cache's LRU with the disk blocks streaming through it every token,
        and a model larger than RAM would push them out too. Without a disk tier they are
        the checkpoint's own pages (no copy, as transformers keeps them)."""
        return any(w.storage == DISK for w in self.where.values())

    def private_map(self, file: Path) -> mmap.mmap:
        """This load's copy-on-write map of `file` (weights kept as file pages), made once."""
        if file not in self.maps:
            self.maps[file] = checkpoint.private_map(file)
        return self.maps[file]

    def keys_on(self, device: Device) -> list[str]:
        return [k for r in self.keys.recipes for k in r.targets if self.where[k].storage == device]

    def handled(self, recipe: Recipe) -> bool:
        """The recipe makes fused experts kept as per-expert tensors instead."""
        return any(t.rsplit(".", 1)[0] in self.experts for t in recipe.targets)

    def undo(self) -> None:
        """Put every tensor back as it was (meta), so no device memory stays held."""
        for table, name, value in self.before:
            table[name] = value
        for module in self.model.modules():
            module.__dict__.pop(EXPERTS_ATTR, None)
        self.loaded.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _place_recipe(
    job: _Job, recipe: Recipe, cached: Mapping[str, TensorInfo], meter: Meter
) -> None:
    """Make the recipe's targets and put each on its storage device (disk: a file view)."""
    rest = []
    for key in recipe.targets:
        if job.where[key].storage != DISK:
            rest.append(key)
            continue
        info = cached[key] if key in cached else recipe.inputs[0]
        view = checkpoint.tensor_view(info, mapping=job.private_map(info.file))
        job.set(key, view)  # zero-copy: the parameter IS the file's page cache, copy-on-write
        if key not in cached:  # a converted tensor was counted when _offload wrote it
            meter.advance(DISK, view.nbytes)
    if not rest:
        return
    info, storage = recipe.inputs[0], job.where[rest[0]].storage
    if storage == CPU and _zero_copy(job, recipe, rest[0]):
        if job.streams_disk:  # RAM the disk tier's page cache cannot push out
            tensor = _empty(info, job, rest[0])
            job.reads.start(info, tensor, done=lambda n: meter.advance(CPU, n))  # see wait()
        else:  # the file's pages, copy-on-write (as safetensors gives transformers)
            tensor = checkpoint.tensor_view(info, mapping=job.private_map(info.file))
            job.reads.populate(tensor, done=lambda n: meter.advance(CPU, n))
        job.set(rest[0], tensor)
        return
    made = job.reader.run(recipe, job.model)
    for key in rest:
        storage = job.where[key].storage
        tensor = _to(made.pop(key), storage, job.dtype(key), job, key)
        if job.reader.owns(tensor):  # a conversion that returned its input as is
            tensor = tensor.clone()
        job.set(key, tensor)
        meter.advance(storage, tensor.nbytes)


def _zero_copy(job: _Job, recipe: Recipe, key: str) -> bool:
    """A disk tensor can be the checkpoint itself: same dtype, stored 1:1 in a safetensors file."""
    info = recipe.inputs[0]
    return recipe.is_copy and info.offset >= 0 and info.dtype == job.dtype(key)


# --- reading ---------------------------------------------------------------------


class _Reader:
    """Reads a recipe's inputs into one scratch buffer reused from recipe to recipe.

    Inputs that are converted (another dtype, fused experts) are temporaries; reusing one
    buffer keeps RAM at the placed weights plus one recipe's inputs, instead of a trail of
    freed temporaries that the allocator keeps mapped.
    """

    def __init__(self, reads: ReadPool) -> None:
        self.reads = reads
        self.scratch = torch.empty(0, dtype=torch.uint8)

    def run(self, recipe: Recipe, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        slots = self._stage(recipe.inputs)

        def read(info: TensorInfo) -> torch.Tensor:
            if info.offset < 0:  # pickled .bin: torch's own mmap, copied
                return checkpoint.read_tensor(info)
            self.reads.read(info, slots[info.name])
            return slots[info.name]

        return run_recipe(recipe, model, read)

    def _stage(self, infos: tuple[TensorInfo, ...]) -> dict[str, torch.Tensor]:
        starts, size = [], 0  # bytes; every slot 64-byte aligned
        for info in infos:
            starts.append(size)
            size += info.nbytes + (-info.nbytes % ALIGN)
        if self.scratch.numel() < size:
            self.scratch = torch.empty(0, dtype=torch.uint8)  # free the old one first
            self.scratch = torch.empty(size, dtype=torch.uint8)
        return {
            info.name: self.scratch[start : start + info.nbytes].view(info.dtype).view(info.shape)
            for info, start in zip(infos, starts, strict=True)
        }

    def owns(self, tensor: torch.Tensor) -> bool:
        scratch = self.scratch.untyped_storage()
        return (
            tensor.device.type == "cpu"
            and tensor.untyped_storage().data_ptr() == scratch.data_ptr()
        )


def _to(
    tensor: torch.Tensor, device: Device, dtype: torch.dtype, job: _Job, key: str
) -> torch.Tensor:
    """`tensor` on `device` in `dtype`; running out of memory becomes DeviceOutOfMemory."""
    with _memory_of(job, device, key):
        return _copy(tensor, device.torch(), dtype)


def _empty(info: TensorInfo, job: _Job, key: str) -> torch.Tensor:
    """An uninitialised CPU tensor for `info`; running out of memory becomes DeviceOutOfMemory."""
    with _memory_of(job, CPU, key):
        return torch.empty(info.shape, dtype=info.dtype)


@contextlib.contextmanager
def _memory_of(job: _Job, device: Device, key: str) -> Iterator[None]:
    try:
        yield
    except torch.OutOfMemoryError as error:
        raise _out_of_memory(job, device, key) from error
    except RuntimeError as error:  # the CPU allocator raises a plain RuntimeError
        if "can't allocate memory" not in str(error):
            raise
        raise _out_of_memory(job, device, key) from error


def _copy(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(device=device, dtype=dtype)  # no copy when both already match


def _out_of_memory(job: _Job, device: Device, key: str) -> DeviceOutOfMemory:
    needed = sum(job.nbytes(k) for k in job.keys_on(device))  # bytes the plan puts there
    placed = job.loaded.get(device, 0)
    free = _free_now(device)
    fits = placed + (free or 0)  # bytes that device could hold
    budgets = {str(u.device): u.budget for u in job.plan.devices}
    budgets[str(device)] = int(min(budgets.get(str(device), fits), fits) * 0.9)
    suggestion = ", ".join(
        f"{d!r}: {format_size(b).replace(' ', '')!r}" for d, b in budgets.items()
    )
    return DeviceOutOfMemory(
        f"{device} ran out of memory while loading {key} ({format_size(job.nbytes(key))}):"
        f" the plan puts {format_size(needed)} of weights there; {format_size(placed)} were"
        f" placed and {format_size(free) if free is not None else 'an unknown amount'} is free."
        f" Everything loaded so far was freed. Plan again with a lower budget for {device},"
        f" e.g. devicemap.plan(model, max_memory={{{suggestion}}})"
    )


def _free_now(device: Device) -> int | None:
    if device.kind == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(device.index)[0])
    if device == CPU:
        return cpu_memory()[0]  # cgroup limits included
    return None


# --- the converted disk cache ----------------------------------------------------------


def _offload_dir(offload_dir: str | os.PathLike[str] | None) -> Path:
    return default_dir() if offload_dir is None else Path(offload_dir).expanduser()


def _offload(job: _Job, directory: Path, skeleton: Skeleton, meter: Meter) -> dict[str, TensorInfo]:
    """Disk tensors that cannot be the checkpoint itself, in one converted safetensors file."""
    todo = {
        key: recipe
        for recipe in job.keys.recipes
        for key in recipe.targets
        if job.where[key].storage == DISK
        and not _zero_copy(job, recipe, key)
        and not job.handled(recipe)
    }
    if not todo:
        return {}
    specs = [(key, job.dtype(key), tuple(job.like(key).shape)) for key in todo]
    sources = [
        source_identity(f) for f in sorted({str(i.file) for r in todo.values() for i in r.inputs})
    ]
    fingerprint = _fingerprint(job, skeleton, todo, sources)
    cache = cache_layout(directory, fingerprint, specs, model=skeleton.source.name, sources=sources)
    sweep(directory, keep=cache.path)  # dead writers' temp files, caches of changed sources
    if cache.usable():
        meter.advance(DISK, sum(i.nbytes for i in cache.tensors.values()))
    else:
        cache.write(_converted(job, todo, meter))
        checkpoint.close_mmaps()  # a map cached for an older file at that path must go
    return dict(cache.tensors)


def _expert_sources(job: _Job) -> dict[str, dict[str, Pieces]]:
    """Experts modules stored on cpu/disk and computed by the CPU whose every parameter is
    a concatenation of the checkpoint's per-expert tensors in the plan's dtype."""
    modules = {
        name: module
        for name, module in job.model.named_modules()
        if name in job.plan.device_map and is_experts(module)
    }
    found: dict[str, dict[str, Pieces]] = {}
    for name, recipes in experts_recipes(job.keys.recipes, modules).items():
        where = job.where[recipes[0].targets[0]]
        params = {f"{name}.{p}" for p, _ in modules[name].named_parameters(recurse=False)}
        made = {t for r in recipes for t in r.targets}
        if where.storage not in (CPU, DISK) or where.execute != CPU or made != params:
            continue
        pieces = {}
        for recipe in recipes:
            target = recipe.targets[0]
            fit = expert_pieces(recipe, tuple(job.like(target).shape), job.model)
            if fit is None or any(
                i.dtype != job.dtype(target) or i.offset < 0 for parts in fit for i in parts
            ):
                break
            pieces[leaf(target)] = fit
        else:
            found[name] = pieces
    return found


def _place_experts(job: _Job, name: str, pieces: dict[str, Pieces], meter: Meter) -> None:
    """Each expert's tensors as views of the checkpoint (copy-on-write), or beside a disk
    tier for cpu-stored experts read into ordinary RAM; the fused parameters stay on meta."""
    storage = job.where[f"{name}.{next(iter(pieces))}"].storage
    in_ram = storage == CPU and job.streams_disk

    def tensor(info: TensorInfo) -> torch.Tensor:
        if in_ram:
            out = _empty(info, job, name)
            job.reads.start(info, out, done=lambda n: meter.advance(CPU, n))
            return out
        meter.advance(storage, info.nbytes)
        return checkpoint.tensor_view(info, mapping=job.private_map(info.file))

    parts = {key: [tuple(tensor(i) for i in p) for p in per] for key, per in pieces.items()}
    module = job.model.get_submodule(name)
    module.__dict__[EXPERTS_ATTR] = ExpertWeights(parts)
    job.loaded[storage] = job.loaded.get(storage, 0) + sum(
        i.nbytes for per in pieces.values() for p in per for i in p
    )


def _fingerprint(
    job: _Job, skeleton: Skeleton, todo: Mapping[str, Recipe], sources: list[Source]
) -> str:
    """sha256 of the model, dtype, the cached tensors and the identity of each source file
    (size, mtime, inode, ctime: `cp -p` keeps the first two, never the ctime)."""
    tensors = [(k, str(job.dtype(k))) for k in todo]
    blob = json.dumps([skeleton.fingerprint, str(job.plan.dtype), tensors, sources])
    return hashlib.sha256(blob.encode()).hexdigest()


def _converted(
    job: _Job, todo: Mapping[str, Recipe], meter: Meter
) -> Iterator[tuple[str, torch.Tensor]]:
    """Each cached tensor in turn, made by its recipe (each recipe runs once for its targets)."""
    made: dict[str, torch.Tensor] = {}
    last: Recipe | None = None
    for key, recipe in todo.items():
        if recipe is not last or key not in made:
            made, last = job.reader.run(recipe, job.model), recipe
        tensor = made.pop(key).to(job.dtype(key))
        yield key, tensor
        meter.advance(DISK, tensor.nbytes)


def _totals(job: _Job) -> dict[Device, int]:
    """Bytes to place per storage device, for the progress bar."""
    totals: dict[Device, int] = {}
    for recipe in job.keys.recipes:
        for key in recipe.targets:
            storage = job.where[key].storage
            totals[storage] = totals.get(storage, 0) + job.nbytes(key)
    return totals


# --- after the weights -------------------------------------------------------------


def _finish(job: _Job, skeleton: Skeleton) -> None:
    """Buffers to their execution device, ties, eval mode, generation config, hooks."""
    model = job.model
    for name, buffer in list(_non_persistent(model)):
        if name not in job.where:  # another rank's: meta here, as its weights
            path, _, leaf = name.rpartition(".")
            model.get_submodule(path)._buffers[leaf] = buffer.to("meta")
            continue
        if buffer.is_meta:
            raise LoadError(
                f"non-persistent buffer {name} is still on meta; build the model with"
                " devicemap.model.skeleton.build_skeleton, which computes such buffers"
            )
        path, _, leaf = name.rpartition(".")
        model.get_submodule(path)._buffers[leaf] = buffer.to(job.where[name].execute.torch())
    tie = getattr(model, "tie_weights", None)
    if tie is not None and getattr(model, "all_tied_weights_keys", None) is not None:
        tie(missing_keys=set(job.keys.not_loaded), recompute_mapping=False)
    _regenerate(job)
    _drop_remote(job)
    kept = tuple(f"{name}." for name in job.experts)  # fused experts kept as pieces: meta
    kept += tuple(f"{name}." for name in (job.plan.stage.remote if job.plan.stage else ()))
    tensors = [*model.named_parameters(), *model.named_buffers()]
    left = [n for n, t in tensors if t.is_meta and not n.startswith(kept)]
    if left:
        raise LoadError(f"nothing in the checkpoint filled {', '.join(left[:8])}")
    model.eval()
    _generation_config(model, skeleton.source.root)
    model.devicemap_plan = job.plan  # type: ignore[assignment]
    _dispatch(model, job.plan, job.maps)  # the files its weights are pages of, watched


def _drop_remote(job: _Job) -> None:
    """Other ranks' blocks hold meta tensors only, also where a tie gave them one of this
    rank's (GPT-2's LM head on rank 0 shares the embedding): they run on meta here."""
    if job.plan.stage is None:
        return
    for name in job.plan.stage.remote:
        for sub in job.model.get_submodule(name).modules():
            for key, param in list(sub._parameters.items()):
                if param is not None and not param.is_meta:
                    sub._parameters[key] = torch.nn.Parameter(param.to("meta"), param.requires_grad)
            for key, buffer in list(sub._buffers.items()):
                if buffer is not None and not buffer.is_meta:
                    sub._buffers[key] = buffer.to("meta")


def _regenerate(job: _Job) -> None:
    """Weights the checkpoint lacks and the model declares it regenerates at load
    (`_keys_to_ignore_on_load_missing`: Marian's sinusoidal positions) are computed by
    transformers' initialisers on their block's execution device, as from_pretrained does."""
    regenerated = set(job.keys.regenerated)
    names = [n for n, t in job.model.named_parameters() if t.is_meta and n in regenerated]
    for name in names:
        path, _, leaf = name.rpartition(".")
        module = job.model.get_submodule(path)
        param = module._parameters[leaf]
        assert param is not None
        device = job.where[name].execute.torch()
        with _memory_of(job, job.where[name].execute, name):
            empty = torch.empty_like(param, device=device)
        module._parameters[leaf] = torch.nn.Parameter(empty, requires_grad=param.requires_grad)
    initialize(job.model, names)


def _generation_config(model: torch.nn.Module, root: Path) -> None:
    can_generate = getattr(model, "can_generate", None)
    if (
        can_generate is None
        or not can_generate()
        or not (root / "generation_config.json").is_file()
    ):
        return
    from transformers import GenerationConfig

    # the model's own kind where it has one (DiffusionGemma's sampler settings), as
    # from_pretrained reads it
    kind = getattr(model, "generation_config_class", None) or GenerationConfig
    model.generation_config = kind.from_pretrained(root)


def _dispatch(model: torch.nn.Module, plan: Plan, files: Iterable[Path]) -> None:
    from ..run.dispatch import dispatch  # dispatch imports plan/offload machinery: load it late

    dispatch(model, plan, watch=files)
