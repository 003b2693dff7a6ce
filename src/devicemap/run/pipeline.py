"""Pipeline stages at run time: hooks that make one rank's model compute only its stage.

Every rank runs the whole model's forward (and `generate`) in lockstep; its Stage
(plan/stage.py) says what the blocks other ranks hold do here:

- "skip": a decoder layer is replaced by a RemoteLayer stand-in, which passes its input
  through and keeps this rank's KV cache lengths (hence masks and positions) in step;
- "zeros": the embeddings (rank 0's) give zeros on this rank's first device, so the model
  computes its masks and positions here from real tensors;
- "meta": a block after the last layer (the final norm) runs on meta tensors, shapes only;
- "logits": the LM head (the last rank's) gives the logits the last rank broadcasts.

At the stage's own edges: the first layer's input hidden states are received from the
previous rank (the tensor in their place gives their shape), the last layer's output is
sent to the next rank, and the last rank broadcasts its LM head's output. Only the hidden
states of the boundaries and the logits cross; nothing is re-sent.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..errors import PlanError, RankError
from ..plan.stage import Stage
from . import ranks

Hook = Callable[..., Any]


def attach(
    model: torch.nn.Module, stage: Stage, home: torch.device, devices: Mapping[str, torch.device]
) -> list[Any]:
    """Hook `model` for its rank's stage; `home`: where this rank's inputs are, `devices`:
    module -> where it runs (for the received hidden states). Returns the handles."""
    handles: list[Any] = []
    for name, role in stage.remote.items():
        module = model.get_submodule(name)
        if role == "skip":
            handles.append(_stand_in(model, name, module))
            continue
        handles.append(module.register_forward_pre_hook(_to_meta, with_kwargs=True, prepend=True))
        if role == "zeros":
            handles.append(module.register_forward_hook(_zeros(home)))
        elif role == "logits":
            handles.append(module.register_forward_hook(_received_logits(stage, home)))
    if stage.entry is not None:
        entry = model.get_submodule(stage.entry)
        where = devices.get(stage.entry, home)
        hook = _receive(stage.rank - 1, where)
        handles.append(entry.register_forward_pre_hook(hook, with_kwargs=True, prepend=True))
    if stage.exit is not None:
        handles.append(model.get_submodule(stage.exit).register_forward_hook(_send(stage.rank + 1)))
    if stage.head is not None:
        head = model.get_submodule(stage.head)
        handles.append(head.register_forward_hook(_broadcast_logits(stage.rank)))
    return handles


class RemoteLayer(torch.nn.Module):
    """Stands in for a decoder layer another rank holds (its weights are not here): returns
    its input hidden states as they are, and appends its tokens to this rank's KV cache as
    one-wide keys and values (4 bytes a token at fp32), so the cache's lengths (which masks
    and positions are computed from) are what the real layer would have made them."""

    def __init__(self, layer: torch.nn.Module, index: int | None):
        super().__init__()
        self.index = index  # the layer's slot in the cache (None: it keeps none)
        self.__dict__["held_elsewhere"] = layer  # the real (meta) layer, put back on release

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden, _ = _hidden(args, kwargs)
        cache = _cache_in(args, kwargs)
        if cache is not None and self.index is not None:
            batch, tokens = hidden.shape[0], hidden.shape[1]
            device = torch.device("cpu") if hidden.is_meta else hidden.device
            # one value per token: a cache layer with no elements counts as empty (length 0)
            stub = torch.zeros(batch, 1, tokens, 1, dtype=hidden.dtype, device=device)
            cache.update(stub, stub, self.index)
        return hidden


class _Swap:
    """Puts a layer back in its parent's place (the handle release() removes)."""

    def __init__(self, parent: torch.nn.Module, leaf: str, original: torch.nn.Module):
        self.parent, self.leaf, self.original = parent, leaf, original

    def remove(self) -> None:
        self.parent._modules[self.leaf] = self.original


def _stand_in(model: torch.nn.Module, name: str, layer: torch.nn.Module) -> _Swap:
    path, _, leaf = name.rpartition(".")
    parent = model.get_submodule(path)
    parent._modules[leaf] = RemoteLayer(layer, _layer_index(layer, leaf))
    return _Swap(parent, leaf, layer)


def _layer_index(layer: torch.nn.Module, leaf: str) -> int | None:
    """The cache slot the layer writes: its attention's layer_idx, else its list position."""
    for module in layer.modules():
        index = getattr(module, "layer_idx", None)
        if isinstance(index, int):
            return index
    return int(leaf) if leaf.isdigit() else None


def _cache_in(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    from transformers.cache_utils import Cache, EncoderDecoderCache

    for value in (*args, *kwargs.values()):
        if isinstance(value, EncoderDecoderCache):
            return value.self_attention_cache
        if isinstance(value, Cache):
            return value
    return None


def _meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value if value.is_meta else torch.empty_like(value, device="meta")
    if isinstance(value, tuple):
        return tuple(_meta(v) for v in value)
    if isinstance(value, list):
        return [_meta(v) for v in value]
    if isinstance(value, dict):
        return {k: _meta(v) for k, v in value.items()}
    return value  # the cache, flags, config values


def _to_meta(module: Any, args: Any, kwargs: Any) -> tuple[Any, Any]:
    """Another rank's block computes shapes only."""
    return _meta(args), _meta(kwargs)


def _real(value: Any, make: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`value` with each meta tensor replaced by `make(it)` (a ModelOutput keeps its class)."""
    if isinstance(value, torch.Tensor):
        return make(value) if value.is_meta else value
    if isinstance(value, (tuple, list)):
        return type(value)(_real(v, make) for v in value)
    if isinstance(value, dict):  # a ModelOutput too: updated in place, it is this call's own
        for key, item in list(value.items()):
            value[key] = _real(item, make)
    return value


def _zeros(home: torch.device) -> Hook:
    def hook(module: Any, args: Any, output: Any) -> Any:
        return _real(output, lambda t: torch.zeros(t.shape, dtype=t.dtype, device=home))

    return hook


def _hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, bool]:
    """A layer's input hidden states: its first positional argument, or hidden_states=."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0], True
    value = kwargs.get("hidden_states")
    if not isinstance(value, torch.Tensor):
        raise RankError(
            "a pipeline stage's first layer was called without hidden states as its first"
            " argument or hidden_states=: this model's layers cannot be cut between ranks"
        )
    return value, False


def _receive(source: int, where: torch.device) -> Hook:
    def hook(module: Any, args: Any, kwargs: Any) -> tuple[Any, Any]:
        like, positional = _hidden(args, kwargs)
        hidden = ranks.recv(like, source).to(where)
        if positional:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    return hook


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise RankError(
        f"a pipeline stage's last layer returned {type(output).__name__}, not its hidden"
        " states: this model's layers cannot be cut between ranks"
    )


def _send(to: int) -> Hook:
    def hook(module: Any, args: Any, output: Any) -> None:
        ranks.send(_first_tensor(output), to)

    return hook


def _broadcast_logits(rank: int) -> Hook:
    def hook(module: Any, args: Any, output: Any) -> None:
        ranks.broadcast(_first_tensor(output), rank)

    return hook


def _received_logits(stage: Stage, home: torch.device) -> Hook:
    last = stage.ranks - 1

    def hook(module: Any, args: Any, output: Any) -> Any:
        return _real(output, lambda t: ranks.broadcast(t, last).to(home))

    return hook


# --- micro-batches ----------------------------------------------------------------------


def generate_micro_batches(
    model: Any, batches: Sequence[Mapping[str, Any]], **options: Any
) -> list[Any]:
    """`model.generate(**batch, **options)` for each micro-batch, side by side: one thread
    and one lane (process group) each, so while the last stage computes one micro-batch
    the first computes the next; at batch 1 per stage only one stage works at a time.
    Every rank calls it with the same micro-batches (rank 0 shares them), in the same order.
    PlanError when a stage streams offloaded weights: one forward at a time reads them."""
    plan = getattr(model, "devicemap_plan", None)
    if plan is not None and len(batches) > 1 and _streams(plan):
        raise PlanError(
            "micro-batches run several forwards at once, and this stage streams offloaded"
            " weights (disk, or stored off the device that runs them), which one forward at a"
            " time reads: give each rank the memory to hold its stage, or one micro-batch"
        )
    if ranks.launched():
        ranks.open_lanes(len(batches))
    results: list[Any] = [None] * len(batches)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            with ranks.lane(index) if ranks.launched() else contextlib.nullcontext():
                results[index] = model.generate(**batches[index], **options)
        except BaseException as error:  # raised in the caller's thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def _streams(plan: Any) -> bool:
    return any(
        where == "disk" or plan.exec_map.get(block, where) != where
        for block, where in plan.device_map.items()
    )
