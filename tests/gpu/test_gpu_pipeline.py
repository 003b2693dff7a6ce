"""Pipeline stages on a GPU (issue 14): two ranks on this machine, each stage on cuda:0,
hidden states and logits copied to the host and sent over gloo. Compared with the plain
model on cuda:0 (the same kernels on the same shapes: close, the tokens equal).

Skipped without CUDA (tests/gpu/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers as tf

from pipeline_worker import PROMPT
from ranks import PYTHON, launch
from tiny import make_tiny

WORKER = str(Path(__file__).parents[1] / "pipeline_worker.py")


def test_two_ranks_with_stages_on_the_gpu(tmp_path: Path) -> None:
    model = make_tiny("llama", tmp_path / "llama")
    results = launch([[PYTHON, WORKER, str(model), str(tmp_path), "--mode", "gpu"]] * 2, tmp_path)
    for r in results:
        assert r.returncode == 0, f"rank {r.rank}:\n{r.stderr[-3000:]}"
    plain = tf.AutoModelForCausalLM.from_pretrained(model).eval().to("cuda:0")
    ids = torch.tensor(PROMPT, device="cuda:0")
    with torch.no_grad():
        logits = plain(input_ids=ids).logits.cpu()
        greedy = plain.generate(ids, max_new_tokens=8, do_sample=False).tolist()
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        torch.testing.assert_close(torch.tensor(got["logits"]), logits, atol=1e-4, rtol=1e-4)
        assert got["greedy"] == greedy
        print(
            f"rank {rank}: {len(got['real'])} tensors on cuda:0 of", len(got["real"] + got["meta"])
        )
