"""On a real GPU: what the default --gpu-margin keeps free is more than what the CUDA
context, kernels and cuBLAS workspaces take beyond PyTorch's allocator; and the serving
engine batches rows on cuda with the tokens `generate` gives each alone.

Skipped without CUDA (tests/gpu/conftest.py). Prints the measured figures (-s) for the note.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

import devicemap
from devicemap.devices import gpu_margin_bytes
from devicemap.run.generate import Sampling
from devicemap.serve.engine import Engine, Event, Job
from test_generate import byte_tokenizer
from tiny import build_tiny, make_tiny_chat

CUDA = torch.device("cuda:0")


def test_the_default_margin_covers_what_the_allocator_does_not_count(tmp_path: Path) -> None:
    model_dir = make_tiny_chat(
        tmp_path / "llama", byte_tokenizer(), hidden_size=256, intermediate_size=1024
    )
    plan = devicemap.plan(model_dir, context=256)  # budgets measured from free memory
    cuda = next(u for u in plan.devices if u.device.kind == "cuda")
    free, total = torch.cuda.mem_get_info(0)
    margin = gpu_margin_bytes(total, None)
    assert cuda.budget <= free - margin + (1 << 20), (cuda.budget, free, margin)
    model = devicemap.load(model_dir, plan=plan, progress=False)
    try:
        ids = torch.randint(3, 200, (1, 64), device=CUDA)
        with torch.no_grad():
            model.generate(ids, max_new_tokens=16, do_sample=False)
        torch.cuda.synchronize()
        free_after, _ = torch.cuda.mem_get_info(0)
        outside = (total - free_after) - torch.cuda.memory_reserved(0)  # context, cuBLAS ...
        print(f"\nGPU {torch.cuda.get_device_name(0)}: total {total / 2**30:.1f} GiB, default"
              f" margin {margin / 2**20:.0f} MiB, outside the allocator {outside / 2**20:.0f} MiB"
              f" (other processes included)")  # fmt: skip
        assert outside < margin
    finally:
        devicemap.release(model)


def test_the_engine_batches_rows_on_cuda_like_generate_alone() -> None:
    tok = byte_tokenizer()
    model = build_tiny("llama", vocab_size=len(tok)).to(CUDA)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 1)
    prompts = [list(tok(t).input_ids) for t in ("a", "hello there", "the quick brown fox")]
    expected = []
    for ids in prompts:
        x = torch.tensor([ids], device=CUDA)
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                 max_new_tokens=12, pad_token_id=2)  # fmt: skip
        expected.append(out[0, len(ids) :].tolist())
    engine = Engine(model, tok, max_batch=4)
    done = [threading.Event() for _ in prompts]
    jobs: list[Job] = []
    try:
        for ids, flag in zip(prompts, done, strict=True):

            def emit(event: Event, flag: Any = flag) -> None:
                if event.kind != "text":
                    flag.set()

            jobs.append(Job(ids, Sampling(max_new_tokens=12), emit))
            engine.submit(jobs[-1])
        assert all(flag.wait(120) for flag in done)
        assert [job.ids for job in jobs] == expected
        assert engine.tokens / max(engine.decode_steps, 1) > 1.5
    finally:
        engine.close()
