"""The seed's MiniCPM-V split on a real GPU: embeddings, the first layer, the LM head, the
vision tower `vpm` and the `resampler` on cuda:0, the other layers on cpu and disk streamed
to cuda:0; the chat answer and the logits equal plain transformers on cuda:0.

Skipped without CUDA (tests/gpu/conftest.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers as tf

import devicemap
from custom_vlm import isolated_modules_cache, make_tiny_minicpmv
from test_custom_code import MSGS, SEED_PINS, picture

CUDA = torch.device("cuda:0")


@pytest.fixture(scope="module")
def vlm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with isolated_modules_cache(tmp_path_factory.mktemp("hf_modules")):
        yield make_tiny_minicpmv(tmp_path_factory.mktemp("vlm") / "tiny-minicpmv")


def test_seed_split_on_cuda_chats_like_transformers_on_cuda(vlm: Path) -> None:
    tokenizer = tf.AutoTokenizer.from_pretrained(vlm, trust_remote_code=True)
    plain = tf.AutoModel.from_pretrained(vlm, trust_remote_code=True).eval().to(CUDA)
    expected = plain.chat(image=picture(), msgs=MSGS, tokenizer=tokenizer, max_new_tokens=8)
    pins = dict.fromkeys(SEED_PINS, 0)
    pins.update({"llm.model.layers.2": "cpu", "llm.model.layers.3": "disk"})
    plan = devicemap.plan(
        vlm,
        max_memory={0: "2GiB", "cpu": "1GiB", "disk": "1GiB"},
        pins=pins,
        context=128,
        trust_remote_code=True,
    )
    assert plan.exec_map["llm.model.layers.3"] == "cuda:0"  # streamed in
    with devicemap.releasing(
        devicemap.load(vlm, plan=plan, trust_remote_code=True, progress=False)
    ) as model:
        got = model.chat(image=picture(), msgs=MSGS, tokenizer=tokenizer, max_new_tokens=8)
        assert got == expected
        ids = torch.tensor([[1, 20, 30, 40]], device=CUDA)
        with torch.no_grad():
            ours = model(input_ids=ids).logits
            theirs = plain(input_ids=ids).logits
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
