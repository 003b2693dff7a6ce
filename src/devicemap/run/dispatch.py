"""Run a placed model: PyTorch hooks at device boundaries, offloaded blocks brought in.

`dispatch(model, plan)` takes a model whose weights already sit on their storage
devices (load.py puts them there) and attaches hooks with PyTorch's own API
(`register_forward_pre_hook(with_kwargs=True)`, `register_forward_hook`), never a
replaced `forward`:

- entry hooks on the model (and on its encoder, which `generate` calls on its own):
  inputs go to the *home* device (where the first block executes, so the masks,
  positions and rotary embeddings the model computes between blocks live there), and
  outputs come back on the device the inputs came on;
- an input hook on every block from the first device change on (`boundaries`): such a
  block gets tensors from the previous block *and* the model-level masks and position
  embeddings from home, so each needs a check; a tensor already in place costs one
  device comparison, and one moved for an earlier block is found in a per-forward memo
  (moved once per forward however many blocks need it);
- offload hooks on blocks stored off their execution device (offload.py).

Transformers `Cache` objects are passed through untouched: each layer's cache is
created from its own key states, so it lives (and stays) on that layer's execution
device. `release(model)` removes every hook, stops the offload threads and leaves the
model's weights on the meta device, so device memory and mmaps go deterministically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import functools
import gc
import os
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from ..devices import Device, parse_device
from ..errors import CheckpointChanged, LoadError, PlanError, UnknownDevice
from ..model.checkpoint import close_mmaps
from ..model.skeleton import is_experts
from ..plan.planner import Plan
from ..plan.stage import Stage
from . import expert_cache, experts, pipeline
from .experts import EXPERTS_ATTR
from .mover import Mover, first_device
from .offload import BlockWeights, GpuStreamer, Offload, PagePrefetcher, block_weights
from .pages import file_identity

M = TypeVar("M", bound=torch.nn.Module)
_STATE = "_devicemap_dispatch"  # attribute on the model holding what dispatch attached


@dataclass(frozen=True)
class Layout:
    """What dispatch needs from a plan: blocks in execution order, storage and execution."""

    order: tuple[str, ...]  # module prefixes in execution order
    storage: Mapping[str, Device]
    execution: Mapping[str, Device]
    traced: bool = True  # False: `order` is registration order, not the traced forward order
    expert_cache: int = 0  # slots of each GPU's pool for routed experts stored off the GPUs
    streamed: frozenset[str] = frozenset()  # disk blocks read each token and then dropped


def layout_of(plan: Plan) -> Layout:
    """The blocks of `plan` with their storage and execution devices parsed once."""
    order = tuple(plan.device_map)
    mismatch = sorted(set(order) ^ set(plan.exec_map))
    if mismatch:
        raise PlanError(
            f"plan for {plan.model}: device_map and exec_map name different blocks"
            f" ({', '.join(mismatch)}); make the plan again with devicemap.plan"
        )
    return Layout(
        order=order,
        storage={name: parse_device(plan.device_map[name]) for name in order},
        execution={name: parse_device(plan.exec_map[name]) for name in order},
        traced=plan.order == "forward",
        expert_cache=plan.options.expert_cache,
        streamed=frozenset(plan.streamed),
    )


def boundaries(layout: Layout) -> frozenset[str]:
    """Blocks whose inputs need checking: every block from the first device change on.

    Before the first change every tensor a block can receive (inputs moved home,
    model-level masks and positions, earlier blocks' outputs) is on home. After it,
    a block can receive its predecessor's output from one device and model-level
    tensors from home, so even a block on its predecessor's device needs a hook.
    Without a traced order, any block may run after a change: all are hooked.
    """
    order, execution = layout.order, layout.execution
    if len({execution[name] for name in order}) <= 1:
        return frozenset()
    if not layout.traced:
        return frozenset(order)
    home = execution[order[0]]
    first = next(i for i, name in enumerate(order) if execution[name] != home)
    return frozenset(order[first:])


# --- attaching -------------------------------------------------------------------------


@dataclass
class _Dispatched:
    """Everything dispatch attached to one model; release() undoes all of it."""

    layout: Layout
    handles: list[Any] = field(default_factory=list)  # RemovableHandles, pipeline stand-ins
    offloads: list[Offload] = field(default_factory=list)
    shims: list[torch.nn.Module] = field(default_factory=list)  # modules given an `_hf_hook`
    # files the weights are pages of -> their identity at load (checked per forward)
    watched: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)
    # one forward's state, per thread: pipeline micro-batches run forwards side by side
    forward: _Forward = field(default_factory=lambda: _Forward())

    @property
    def mover(self) -> Mover:
        return self.forward.mover


class _Forward(threading.local):
    """The forward in progress on this thread: entry nesting, the caller's device, moves."""

    def __init__(self) -> None:
        self.depth = 0  # nesting of entry modules (model -> encoder)
        self.input_device: torch.device | None = None
        self.mover = Mover()


class _HfHookShim:
    """transformers' generate sets `encoder._hf_hook.io_same_device = True` on dispatched
    models and otherwise installs accelerate's forward-replacing hook; our entry hook on
    the encoder already returns outputs on the input device."""

    io_same_device = True


def dispatch(
    model: M, plan: Plan, *, prefetch: bool = True, watch: Iterable[str | os.PathLike[str]] = ()
) -> M:
    """Attach device-boundary and offload hooks to `model`, placed as `plan` says; return it.
    `watch`: files the model's weights are pages of, checked at each forward's start. A
    plan for one rank of several (plan.stage) also gets its stage's hooks (run/pipeline.py)."""
    layout = layout_of(plan)
    attach(model, layout, prefetch=prefetch, watch=watch)
    if plan.stage is not None:
        state: _Dispatched = model.__dict__[_STATE]
        try:
            state.handles += pipeline.attach(
                model, plan.stage, _stage_home(layout, ""), _stage_devices(layout, plan.stage)
            )
        except BaseException:
            release(model, drop_weights=False)
            raise
    return model


def _stage_home(layout: Layout, module: str) -> torch.device:
    """Where `module` (a block, or the layer holding MoE pieces; "": this rank) runs."""
    for name in layout.order:
        if not module or name == module or name.startswith(module + "."):
            return layout.execution[name].torch()
    return layout.execution[layout.order[0]].torch()


def _stage_devices(layout: Layout, stage: Stage) -> dict[str, torch.device]:
    return {m: _stage_home(layout, m) for m in (stage.entry, stage.exit) if m is not None}


def attach(
    model: M,
    layout: Layout,
    *,
    hooked: frozenset[str] | None = None,
    prefetch: bool = True,
    watch: Iterable[str | os.PathLike[str]] = (),
) -> M:
    """`dispatch` from a Layout; `hooked` overrides which blocks get input hooks (benchmarks)."""
    if _STATE in model.__dict__:
        raise PlanError("this model is already dispatched; call devicemap.release(model) first")
    modules = _resolve(model, layout)
    _check_storage(model, modules, layout)
    hooked = boundaries(layout) if hooked is None else hooked
    state = _Dispatched(layout=layout, watched=_identities(watch))
    if state.watched:
        _report_faults()  # a page of a file cut short under it: a SIGBUS, reported
    model.__dict__[_STATE] = state
    try:
        offloads = _offloads(modules, layout, prefetch=prefetch)
        state.offloads = list({id(o): o for o in offloads.values()}.values())
        _hook_entries(model, modules, state)
        for name, module in modules.items():
            # the model: entry hooks move; routed experts move their tokens themselves
            move = name in hooked and module is not model and not is_experts(module)
            _hook_block(name, module, state, move=move, off=offloads.get(name))
        _hook_aliases(model, modules, state, offloads)
        if any(is_experts(m) for m in modules.values()):
            experts.select(model)  # computed where they are stored, only those routed to
            _expert_caches(modules, layout)
    except BaseException:
        release(model, drop_weights=False)
        raise
    # where each block runs, for transformers (pipeline puts inputs on the first one)
    model.__dict__["hf_device_map"] = {n: layout.execution[n].map_value for n in layout.order}
    return model


def _expert_caches(modules: Mapping[str, torch.nn.Module], layout: Layout) -> None:
    """A pool of expert slots on each CUDA GPU that runs MoE layers whose routed experts are
    stored off the GPUs (the GPU that runs the block just before them: their router); the
    pool copies through pinned memory on a CUDA stream, so mps has none (the planner
    budgets none there either)."""
    if not layout.expert_cache:
        return
    by_gpu: dict[Device, list[tuple[str, torch.nn.Module]]] = {}
    for i, name in enumerate(layout.order):
        module = modules[name]
        if is_experts(module) and not layout.storage[name].is_gpu and i > 0:
            runs_on = layout.execution[layout.order[i - 1]]
            if runs_on.kind == "cuda":
                by_gpu.setdefault(runs_on, []).append((name, module))
    for device, members in by_gpu.items():
        expert_cache.install(members, device.torch(), layout.expert_cache)


def _resolve(model: torch.nn.Module, layout: Layout) -> dict[str, torch.nn.Module]:
    """The modules the plan's blocks name; loose tensors (a parameter or buffer the plan
    places on its own) are checked to exist and get no hooks: their owner's code uses them
    where they are kept."""
    modules, missing = {}, []
    for name in layout.order:
        try:
            modules[name] = model.get_submodule(name)
        except AttributeError:
            if _loose_tensor(model, name) is None:
                missing.append(name)
    if missing:
        raise PlanError(
            f"the plan names blocks this model does not have: {', '.join(missing)};"
            " the plan was made for another model: make it again with devicemap.plan"
        )
    return modules


def _loose_tensor(model: torch.nn.Module, name: str) -> torch.Tensor | None:
    """The parameter or buffer called `name`, or None."""
    path, _, leaf = name.rpartition(".")
    try:
        owner = model.get_submodule(path)
    except AttributeError:
        return None
    tensor = owner._parameters.get(leaf, owner._buffers.get(leaf))
    return tensor if isinstance(tensor, torch.Tensor) else None


def _check_storage(
    model: torch.nn.Module, modules: Mapping[str, torch.nn.Module], layout: Layout
) -> None:
    """Every weight on its block's storage device (disk: a cpu mmap); all bad blocks listed."""
    bad = []
    for name, module in modules.items():
        want = layout.storage[name].torch()
        kept = _kept_as_pieces(module)  # fused experts the loader kept as per-expert tensors
        wrong = [
            f"{name}.{pname} on {tensor.device}"
            for pname, tensor in (*module.named_parameters(), *module.named_buffers())
            if tensor.device != want
            and not _is_runtime_buffer(module, pname, layout, name)
            and not (kept and tensor.is_meta)
        ]
        if wrong:
            more = f" and {len(wrong) - 1} more" if len(wrong) > 1 else ""
            bad.append(f"{wrong[0]}{more} (plan: {layout.storage[name]})")
    for name in layout.order:
        tensor = None if name in modules else _loose_tensor(model, name)
        allowed = {layout.storage[name].torch(), layout.execution[name].torch()}
        if tensor is not None and tensor.device not in allowed:
            bad.append(f"{name} on {tensor.device} (plan: {layout.storage[name]})")
    if bad:
        raise LoadError(
            f"weights of {len(bad)} block(s) are not on the storage device the plan gives"
            f" them: {'; '.join(bad)}. Load the model with devicemap.load, which places them"
        )


def _kept_as_pieces(module: torch.nn.Module) -> bool:
    return any(EXPERTS_ATTR in m.__dict__ for m in module.modules())


def _is_runtime_buffer(module: torch.nn.Module, pname: str, layout: Layout, name: str) -> bool:
    """Non-persistent buffers (rotary inv_freq) live on the execution device, not storage."""
    owner_name, _, leaf = pname.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    return leaf in owner._non_persistent_buffers_set and (
        getattr(owner, leaf).device == layout.execution[name].torch()
    )


def _offloads(
    modules: Mapping[str, torch.nn.Module], layout: Layout, *, prefetch: bool
) -> dict[str, Offload]:
    """One streamer per GPU that executes cpu/disk-stored blocks; one page prefetcher."""
    streamed: dict[Device, list[BlockWeights]] = {}
    paged: list[BlockWeights] = []
    for name in modules:
        stored, runs = layout.storage[name], layout.execution[name]
        if stored == runs or (stored.kind == "cpu" and runs.kind == "cpu"):
            continue
        weights = block_weights(name, modules[name])
        if runs.kind == "cuda" and stored.kind in ("cpu", "disk"):
            weights = dataclasses.replace(weights, in_ram=stored.kind == "cpu")
            streamed.setdefault(runs, []).append(weights)
        elif runs.kind == "cpu" and stored.kind == "disk":
            paged.append(weights)
        elif runs.kind == "mps":
            raise PlanError(
                f"block {name!r} is stored on {stored} but executes on mps: devicemap does not"
                " stream weights to mps, which shares the CPU's RAM (a copy into the same"
                " memory before every forward); blocks stored on cpu or disk run on the CPU"
                " beside mps. Make the plan again with devicemap.plan (it does so), or"
                " offload_exec='cpu'"
            )
        else:
            raise PlanError(
                f"block {name!r} is stored on {stored} but executes on {runs}; devicemap runs"
                " a block where it is stored, or streams cpu/disk-stored blocks to a CUDA GPU"
                " or the CPU. Make the plan with offload_exec='gpu' or 'cpu'"
            )
    if streamed and not torch.cuda.is_available():
        raise UnknownDevice(
            f"the plan executes offloaded blocks on {', '.join(map(str, streamed))}, but CUDA"
            " is not available here; plan with offload_exec='cpu' or run on a CUDA machine"
        )
    offloads: dict[str, Offload] = {}
    for device, blocks in streamed.items():
        blocks = [b for b in blocks if b.nbytes]
        if blocks:
            streamer = GpuStreamer(
                device.torch(), blocks, prefetch=prefetch, streamed=layout.streamed
            )
            offloads.update((b.name, streamer) for b in blocks)
    paged = [b for b in paged if b.nbytes]
    if paged and prefetch:
        prefetcher = PagePrefetcher(paged, streamed=layout.streamed)
        offloads.update((b.name, prefetcher) for b in paged)
    return offloads


def _hook_entries(
    model: torch.nn.Module, modules: Mapping[str, torch.nn.Module], state: _Dispatched
) -> None:
    """Entry hooks on the model, and on the encoder that `generate` calls by itself."""
    entries = [model]
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        encoder = getattr(model, "get_encoder")()  # noqa: B009 (typed Module has no such method)
        if encoder is not model and isinstance(encoder, torch.nn.Module):
            entries.append(encoder)
            encoder.__dict__["_hf_hook"] = _HfHookShim()
            state.shims.append(encoder)
    for entry in entries:
        home = _home(entry, modules, state.layout)
        pre = functools.partial(_enter, state, home)
        post = functools.partial(_leave, state)
        state.handles.append(entry.register_forward_pre_hook(pre, with_kwargs=True))
        state.handles.append(entry.register_forward_hook(post, always_call=True))


def _home(entry: torch.nn.Module, modules: Mapping[str, torch.nn.Module], layout: Layout) -> Any:
    inside = {id(m) for m in entry.modules()}
    for name in layout.order:
        if name in modules and id(modules[name]) in inside:
            return layout.execution[name].torch()
    return layout.execution[layout.order[0]].torch()


def _enter(
    state: _Dispatched, home: torch.device, module: Any, args: Any, kwargs: Any
) -> tuple[Any, Any] | None:
    now = state.forward
    if now.depth == 0:
        _check_files(state.watched)
    now.depth += 1
    if now.depth == 1:
        now.mover.reset()
        now.input_device = first_device(args, kwargs)
        for offload in state.offloads:
            offload.begin()
    return _moved(now.mover, home, args, kwargs)


def _report_faults() -> None:
    """faulthandler on (once), writing to the process's real stderr: a SIGBUS from a mapped
    weight whose file was cut mid-forward prints 'Fatal Python error: Bus error' and the
    stack instead of a silent death. Where stderr has no file descriptor, left as it is."""
    if faulthandler.is_enabled() or sys.__stderr__ is None:
        return
    with contextlib.suppress(AttributeError, ValueError, OSError):
        faulthandler.enable(file=sys.__stderr__)


def _identities(files: Iterable[str | os.PathLike[str]]) -> dict[str, tuple[int, int, int, int]]:
    return {str(f): file_identity(f) for f in files}


def _check_files(watched: Mapping[str, tuple[int, int, int, int]]) -> None:
    """CheckpointChanged if a file the weights are pages of was rewritten or truncated in
    place since the load: its pages would now be other weights, or a SIGBUS past its end.
    A file replaced by a rename (another inode) or deleted is no danger: the maps hold the
    old file, which stays whole while mapped."""
    for path, before in watched.items():
        try:
            now = file_identity(path)
        except OSError:
            continue  # deleted: the mapped inode lives on
        if now == before or now[2] != before[2]:
            continue
        if now[0] < before[0]:
            what = f"was truncated ({before[0]} -> {now[0]} bytes)"
        elif now[:2] != before[:2]:
            what = "was rewritten"
        else:  # same size and mtime: only the ctime says it (cp -p, rsync -a, or a chmod)
            what = "was changed in place (its ctime moved: rewritten with its mtime kept?)"
        raise CheckpointChanged(
            f"{path} {what} under the running model, whose weights are pages of it: its"
            " answers could be wrong (or the process killed by SIGBUS). Load the model again"
            " (devicemap.release(model), then devicemap.load); to update a checkpoint in use,"
            " write the new file beside it and rename it over the old one"
        )


def _leave(state: _Dispatched, module: Any, args: Any, output: Any) -> Any:
    now = state.forward
    now.depth -= 1
    if now.depth > 0:
        return None
    device, now.input_device = now.input_device, None
    moved = None if device is None or output is None else now.mover.move(output, device)
    now.mover.reset()
    return None if moved is output else moved


def _moved(mover: Mover, device: torch.device, args: Any, kwargs: Any) -> tuple[Any, Any] | None:
    new_args, new_kwargs = mover.move(args, device), mover.move(kwargs, device)
    return None if new_args is args and new_kwargs is kwargs else (new_args, new_kwargs)


def _hook_block(
    name: str, module: torch.nn.Module, state: _Dispatched, *, move: bool, off: Offload | None
) -> None:
    if not (move or off):
        return
    device = state.layout.execution[name].torch()

    def pre(mod: Any, args: Any, kwargs: Any) -> tuple[Any, Any] | None:
        if off is not None:
            off.enter(name)
        return _moved(state.mover, device, args, kwargs) if move else None

    state.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
    if isinstance(off, GpuStreamer) or (isinstance(off, PagePrefetcher) and off.streams(name)):
        exit_ = functools.partial(_exit_block, off, name)
        state.handles.append(module.register_forward_hook(exit_, always_call=True))


def _exit_block(off: Offload, name: str, module: Any, args: Any, output: Any) -> None:
    off.exit(name)


def _hook_aliases(
    model: torch.nn.Module,
    modules: Mapping[str, torch.nn.Module],
    state: _Dispatched,
    offloads: Mapping[str, Offload],
) -> None:
    """Modules outside every block whose weights a block owns (tied embeddings): same hooks."""
    owner: dict[int, str] = {}
    for name, module in modules.items():
        owner.update((id(p), name) for p in module.parameters())
    loose_ids = {
        id(t)
        for n in state.layout.order
        if n not in modules and (t := _loose_tensor(model, n)) is not None
    }
    inside = {id(m) for module in modules.values() for m in module.modules()}
    outside = []
    multi = len(set(state.layout.execution.values())) > 1
    for mname, module in model.named_modules():
        own = [  # meta: another pipeline rank's weights
            p for p in module.parameters(recurse=False) if id(p) not in loose_ids and not p.is_meta
        ]
        if id(module) in inside or not own:
            continue
        names = {owner.get(id(p)) for p in own}
        if None in names or len(names) != 1:
            outside.append(mname or "(the model itself)")
            continue
        block = str(names.pop())
        _hook_block(block, module, state, move=multi, off=offloads.get(block))
    if outside:
        raise PlanError(
            f"modules with weights outside every block of the plan: {', '.join(outside)};"
            " the plan was made for another model: make it again with devicemap.plan"
        )


# --- releasing ---------------------------------------------------------------------------


def release(model: torch.nn.Module, *, drop_weights: bool = True) -> None:
    """Remove every hook dispatch attached and free the model's device memory, now.

    Offload threads stop, staging buffers and streams are dropped, and (by default) every
    parameter and buffer is replaced by an empty one on the meta device, so GPU memory
    and checkpoint mmaps are freed even while the caller still holds `model`; load it
    again to run it. Safe to call twice, and on a model that was never dispatched.
    """
    state: _Dispatched | None = model.__dict__.pop(_STATE, None)
    if state is not None:
        _detach(model, state)
        experts.unselect(model)
        expert_cache.uninstall(model)
    for module in model.modules():
        module.__dict__.pop(EXPERTS_ATTR, None)  # the per-expert views of the checkpoint
    if drop_weights:
        _to_meta(model)
        close_mmaps()  # the loader's cached file maps; each unmaps once no tensor uses it
    gc.collect()
    if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        torch.cuda.empty_cache()  # release only: never on the hot path


def _detach(model: torch.nn.Module, state: _Dispatched) -> None:
    for handle in state.handles:
        handle.remove()
    for offload in state.offloads:
        offload.close()  # threads joined; weights point at their storage again
    for module in state.shims:
        module.__dict__.pop("_hf_hook", None)
    model.__dict__.pop("hf_device_map", None)
    state.handles.clear()
    state.offloads.clear()
    state.mover.reset()


def _to_meta(model: torch.nn.Module) -> None:
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                empty = torch.empty(param.shape, dtype=param.dtype, device="meta")
                module._parameters[name] = torch.nn.Parameter(empty, param.requires_grad)
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype, device="meta")


@contextmanager
def releasing(model: M) -> Iterator[M]:
    """`with releasing(devicemap.load(...)) as model:` runs `release(model)` on exit."""
    try:
        yield model
    finally:
        release(model)


def hook_count(model: torch.nn.Module) -> int:
    """devicemap's forward pre-hooks and forward hooks on all modules of `model`.

    transformers installs hooks of its own (output capturing), which are not counted.
    """
    count = 0
    for module in model.modules():
        hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
        count += sum(_ours(hook) for hook in hooks)
    return count


def _ours(hook: Any) -> bool:
    fn = hook.func if isinstance(hook, functools.partial) else hook
    return getattr(fn, "__module__", None) == __name__


def dispatched_blocks(model: torch.nn.Module) -> Sequence[str]:
    """The blocks of a dispatched model in execution order (empty when not dispatched)."""
    state: _Dispatched | None = model.__dict__.get(_STATE)
    return () if state is None else state.layout.order
