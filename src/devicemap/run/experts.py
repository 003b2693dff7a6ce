"""Routed experts computed where they are stored, reading only the experts the router picked.

devicemap registers one function with transformers' experts interface
(`ALL_EXPERTS_FUNCTIONS["devicemap"]`) and selects it on models whose MoE layers it placed
by expert; the experts' `forward` stays transformers' own. The function

- moves the routed tokens' hidden states (a few KB) to the device the experts are stored
  on, computes there, and returns the result on the device the layer runs on: experts in
  RAM are computed by the CPU while attention runs on the GPU, never copied to it;
- for experts held as the checkpoint's own per-expert tensors (`ExpertWeights`, memory-mapped
  pages of the file, no fused copy), touches only the selected experts: as soon as the
  router has chosen, the missing ones are asked for together with MADV_WILLNEED on exactly
  their bytes (no read-around window pulling in unselected neighbours) and mapped in with
  MADV_POPULATE_READ, then each selected expert is one matmul per projection;
- otherwise (the fused 3-D parameters transformers builds) calls the implementation the
  model had (grouped_mm by default).

The per-expert arithmetic is grouped_mm's, step for step: tokens sorted by expert, one
matmul per expert, gate, down projection, routing weights, the same order of the sums, so
logits are bit-equal to transformers' own (a matmul against [gate; up] equals the two
matmuls side by side, checked in tests/test_moe.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .pages import Pages, fault_in, merged, page_ranges

NAME = "devicemap"
EXPERTS_ATTR = "_devicemap_experts"  # an experts module's ExpertWeights, set by the loader
# an experts module's (ExpertCache, its name, its ExpertWeights), set by dispatch
CACHE_ATTR = "_devicemap_expert_cache"
_ORIGINAL = "_devicemap_original_experts"  # the implementation the model had, on its config


# target ("gate_up_proj") -> expert -> its tensors: per-expert weights wherever they are
Parts = dict[str, dict[int, tuple[torch.Tensor, ...]]]


@dataclass
class ExpertWeights:
    """One MoE layer's routed experts as per-expert tensors (checkpoint views).

    `parts[target][e]`: the tensors whose concatenation along their first (output) dim is
    the fused parameter `target` of expert `e` (gate_up_proj: gate and up; down_proj: down).
    """

    parts: Mapping[str, Sequence[tuple[torch.Tensor, ...]]]
    reads: int = 0  # experts faulted in so far (tests and benchmarks count them)
    fetched: int = 0  # bytes of those experts
    touched: set[int] = field(default_factory=set)  # experts ever computed
    _pages: dict[int, Pages] = field(default_factory=dict, repr=False)  # per expert, cached

    def pages(self, expert: int) -> Pages:
        """Where expert `expert`'s tensors lie in memory (computed once)."""
        if expert not in self._pages:
            self._pages[expert] = page_ranges(self.tensors([expert]))
        return self._pages[expert]

    @property
    def count(self) -> int:
        """How many experts."""
        return len(next(iter(self.parts.values())))

    @property
    def device(self) -> torch.device:
        first = next(iter(self.parts.values()))[0][0]
        return first.device

    def tensors(self, experts: Sequence[int]) -> list[torch.Tensor]:
        return [t for parts in self.parts.values() for e in experts for t in parts[e]]

    def nbytes(self, experts: Sequence[int]) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors(experts))

    @classmethod
    def of_fused(cls, module: torch.nn.Module) -> ExpertWeights | None:
        """An experts module's fused 3-D parameters seen expert by expert (views, no copy);
        None while they are on meta (kept as pieces, or not loaded)."""
        fused = {n: p for n, p in module.named_parameters(recurse=False) if p.dim() >= 2}
        if not fused or any(p.is_meta for p in fused.values()):
            return None
        return cls({n: [(p[e],) for e in range(p.shape[0])] for n, p in fused.items()})


def register() -> None:
    """Add devicemap's function to transformers' experts interface (once)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if NAME not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(NAME, experts_forward)


def select(model: torch.nn.Module) -> None:
    """Compute `model`'s routed experts with devicemap's function, remembering its own: on
    the config each experts module reads (a VLM's text and vision towers have their own)."""
    register()
    configs: list[Any] = [_experts_config(m) for m in model.modules()]
    for config in {id(c): c for c in configs if c is not None}.values():
        current = config._experts_implementation
        if current != NAME:
            config.__dict__[_ORIGINAL] = current
        config._experts_implementation_internal = NAME


def unselect(model: torch.nn.Module) -> None:
    """Give `model` back the experts implementation it had."""
    for module in model.modules():
        config = _experts_config(module)
        if config is not None and _ORIGINAL in config.__dict__:
            config._experts_implementation_internal = config.__dict__.pop(_ORIGINAL)


def _experts_config(module: torch.nn.Module) -> Any:
    if hasattr(module, "is_concatenated") and hasattr(module, "config"):
        return module.config
    return None


def experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,  # [T, H]
    top_k_index: torch.Tensor,  # [T, K]
    top_k_weights: torch.Tensor,  # [T, K]
) -> torch.Tensor:
    """The experts of one MoE layer for T tokens, computed where the experts are stored."""
    home = hidden_states.device
    source: ExpertWeights | None = self.__dict__.get(EXPERTS_ATTR)
    cached = self.__dict__.get(CACHE_ATTR)
    if cached is not None and cached[0].device == home:  # a GPU's pool of expert slots
        out = _from_cache(self, cached, hidden_states, top_k_index, top_k_weights)
        if out is not None:
            return out
    where = source.device if source is not None else _weights_device(self)
    hidden, index, weights = (t.to(where) for t in (hidden_states, top_k_index, top_k_weights))
    if source is not None:
        out = _per_expert(self, source.parts, lambda e: _fetch(source, e), hidden, index, weights)
    else:
        out = _original(self)(self, hidden, index, weights)
    return out.to(home)


def _from_cache(
    self: torch.nn.Module,
    cached: tuple[Any, str, ExpertWeights],
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor | None:
    """Computed on the cache's device from its slots (copied in where missing); None when
    this step selects more experts than the pool has slots."""
    cache, layer, source = cached
    wanted = sorted(set(top_k_index.reshape(-1).tolist()))
    held = cache.take(layer, source, wanted)  # None (counted) when more than its slots
    if held is None:
        return None
    source.touched.update(wanted)
    return _per_expert(self, held, lambda _: None, hidden_states, top_k_index, top_k_weights)


def _weights_device(module: torch.nn.Module) -> torch.device:
    for param in module.parameters(recurse=False):
        if not param.is_meta:
            return param.device
    return torch.device("cpu")


def _original(module: torch.nn.Module) -> Any:
    """The implementation the model had: one from the interface, or the class's own eager."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    name = module.config.__dict__.get(_ORIGINAL, "grouped_mm")
    if name != "eager" and name in ALL_EXPERTS_FUNCTIONS:
        return ALL_EXPERTS_FUNCTIONS[name]
    return type(module).forward.__wrapped__  # type: ignore[attr-defined]


def _per_expert(
    self: Any,
    parts: Mapping[str, Any],  # target -> expert -> its tensors (Parts, or ExpertWeights.parts)
    fetch: Callable[[list[int]], None],  # called with the selected experts before any is used
    hidden_states: torch.Tensor,  # [T, H]
    top_k_index: torch.Tensor,  # [T, K]
    top_k_weights: torch.Tensor,  # [T, K]
) -> torch.Tensor:
    """grouped_mm_experts_forward, with each expert's matmuls on its own tensors."""
    num_top_k = top_k_index.size(-1)
    num_tokens, hidden_dim = hidden_states.size(0), hidden_states.size(-1)
    sample_weights = top_k_weights.reshape(-1)  # [S], S = T x K
    expert_ids = top_k_index.reshape(-1)  # [S]
    expert_ids_g, perm = torch.sort(expert_ids)
    selected = hidden_states[perm // num_top_k]  # [S, H], grouped by expert
    sample_weights_g = sample_weights[perm]
    groups = _groups(expert_ids_g)  # [(expert, start, end)]
    fetch([e for e, _, _ in groups])
    first = "gate_up_proj" if self.has_gate else "up_proj"
    proj = _linear(selected, parts, first, groups, self)  # [S, 2I] or [S, I]
    proj = self._apply_gate(proj) if self.has_gate else self.act_fn(proj)  # [S, I]
    proj = _linear(proj, parts, "down_proj", groups, self)  # [S, H]
    if self.has_post_expert_norm:
        proj = self.post_expert_norm(proj)
    weighted = proj * sample_weights_g.unsqueeze(-1)  # [S, H]
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.size(0), device=perm.device)
    weighted = weighted[inverse]
    out = weighted.view(num_tokens, num_top_k, hidden_dim).sum(dim=1)  # [T, H]
    return out.to(hidden_states.dtype)


def _groups(sorted_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(expert, start, end) of each run of one expert in the sorted ids."""
    experts, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    groups, start = [], 0
    for expert, count in zip(experts.tolist(), counts.tolist(), strict=True):
        groups.append((int(expert), start, start + int(count)))
        start += int(count)
    return groups


def _fetch(source: ExpertWeights, experts: list[int]) -> None:
    """The selected experts' pages, read together before the first is computed."""
    fault_in(merged(source.pages(e) for e in experts), exact=True)
    source.reads += len(experts)
    source.fetched += source.nbytes(experts)
    source.touched.update(experts)


def _linear(
    x: torch.Tensor,  # [S, in]
    every: Mapping[str, Any],
    target: str,
    groups: list[tuple[int, int, int]],
    module: Any,
) -> torch.Tensor:
    """x @ W[e].T for each expert's rows (W[e]: the concatenation of its parts), as
    grouped_mm's _grouped_linear computes it; the bias row of each sample added."""
    parts = every[target]
    transposed = bool(getattr(module, "is_transposed", False))
    some = parts[groups[0][0]] if groups else None  # any selected expert's tensors
    width = sum(p.shape[-1 if transposed else 0] for p in some) if some else 0
    dtype = some[0].dtype if some else x.dtype
    out = torch.zeros(x.size(0), width, dtype=dtype, device=x.device)
    for expert, start, end in groups:
        rows = x[start:end].to(out.dtype)
        pieces = [rows @ (p if transposed else p.T) for p in parts[expert]]
        out[start:end] = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
    bias = every.get(f"{target}_bias")
    if bias is not None:
        out.add_(torch.cat([_bias_rows(bias[e], end - start) for e, start, end in groups]))
    return out


def _bias_rows(pieces: tuple[torch.Tensor, ...], rows: int) -> torch.Tensor:
    bias = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    return bias.unsqueeze(0).expand(rows, -1)
