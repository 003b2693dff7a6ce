"""Dispatch overhead: a resident llama split into blocks on one device vs the plain model.

The same model object (same weights, same memory) is timed plain and with devicemap's
hooks attached, alternating in one process: entry hooks only (what `dispatch` attaches
when every block runs on one device), and an input hook forced on every block (what a
plan with a device change before the first layer costs at most). Decode tokens/s is a
manual loop of one-token forwards over a KV cache, so generate's own Python overhead
does not dilute the ratio. Target: hooked / plain >= 0.98.

    python bench/dispatch.py                    # hidden 512, 8 layers, fp32, CPU
    python bench/dispatch.py --tokens 32 --rounds 21
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
import transformers as tf

from devicemap.devices import CPU
from devicemap.run.dispatch import Layout, attach, hook_count, release
from report import median, write


def build(hidden: int, layers: int, vocab: int) -> Any:
    cfg = tf.LlamaConfig(
        hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=8, vocab_size=vocab,
        max_position_embeddings=4096, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(cfg).eval()


def blocks(model: Any) -> tuple[str, ...]:
    layers = [f"model.layers.{i}" for i in range(len(model.model.layers))]
    return ("model.embed_tokens", "model.rotary_emb", *layers, "model.norm", "lm_head")


@torch.no_grad()
def decode_rate(model: Any, tokens: int) -> tuple[float, float]:
    """Tokens per wall second and per CPU second of this thread: `tokens` one-token
    forwards after an 8-token prefill. With one torch thread all compute is on this
    thread, and its CPU time does not count the time other processes hold the cores."""
    ids = torch.tensor([[1, 5, 17, 42, 99, 7, 3, 250]])
    out = model(input_ids=ids, use_cache=True)
    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(tokens):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)  # [B, 1]
    return tokens / (time.perf_counter() - wall), tokens / (time.thread_time() - cpu)


def _paired(values: list[float], plain: list[float]) -> float:
    return median([v / p for v, p in zip(values, plain, strict=True)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build(args.hidden, args.layers, args.vocab)
    order = blocks(model)
    on_cpu = dict.fromkeys(order, CPU)
    layout = Layout(order=order, storage=on_cpu, execution=on_cpu)
    variants: dict[str, frozenset[str] | None] = {
        "plain": None,
        "entry hooks only": frozenset(),
        "hook on every block": frozenset(order),
    }
    hooks: dict[str, int] = {}
    rates: dict[str, list[float]] = {name: [] for name in variants}  # tokens / wall s
    cpu_rates: dict[str, list[float]] = {name: [] for name in variants}  # tokens / CPU s
    decode_rate(model, 4)  # warm up kernels and allocator
    for round_ in range(args.rounds):
        names = list(variants)[round_ % 3 :] + list(variants)[: round_ % 3]  # rotate order
        for name in names:
            hooked = variants[name]
            if hooked is not None:
                attach(model, layout, hooked=hooked)
                hooks[name] = hook_count(model)
            wall, cpu = decode_rate(model, args.tokens)
            rates[name].append(wall)
            cpu_rates[name].append(cpu)
            if hooked is not None:
                release(model, drop_weights=False)
    # paired: each round's ratio to the plain run of the same round, so load from other
    # processes on a shared machine cancels; the median of those ratios is the result
    rows = [
        {
            "variant": name,
            "hooks": hooks.get(name, 0),
            "tok/s": median(rates[name]),
            "ratio (wall)": _paired(rates[name], rates["plain"]),
            "tok/CPU-s": median(cpu_rates[name]),
            "ratio (CPU)": _paired(cpu_rates[name], cpu_rates["plain"]),
        }
        for name in variants
    ]
    notes = {
        "model": f"llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, fp32",
        "blocks": len(order),
        "tokens per run": args.tokens,
        "rounds": args.rounds,
        "threads": args.threads,
        "target": "ratio >= 0.98",
        "ratios": "median over rounds of (variant / plain of the same round)",
    }
    write("dispatch", rows, notes=notes)


if __name__ == "__main__":
    main()
