"""The tiny custom-code MiniCPM-V fixture (tests/custom_vlm.py), with plain transformers only."""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from PIL import Image

from custom_vlm import ARCHITECTURE, isolated_modules_cache, make_tiny_minicpmv

MSGS = [{"role": "user", "content": "What is in the image?"}]


@pytest.fixture(scope="module")
def modules_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Remote code goes to a temporary HF_MODULES_CACHE, not ~/.cache."""
    with isolated_modules_cache(tmp_path_factory.mktemp("hf_modules")) as path:
        yield path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, modules_cache: Path) -> Path:
    return make_tiny_minicpmv(tmp_path_factory.mktemp("vlm") / "tiny-minicpmv")


def load(directory: Path) -> tuple[Any, Any]:
    tokenizer = tf.AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
    model = tf.AutoModel.from_pretrained(directory, trust_remote_code=True).eval()
    return model, tokenizer


def gradient() -> Image.Image:
    """56x28 (sliced into the whole image + 2 crops): colour ramps across and down."""
    data = bytes(v for y in range(28) for x in range(56) for v in (x * 4, y * 9, (x + y) * 3 % 256))
    return Image.frombytes("RGB", (56, 28), data)


def checkers() -> Image.Image:
    """56x28 black and white 7-pixel checkerboard."""
    img = Image.new("RGB", (56, 28))
    for y in range(28):
        for x in range(56):
            if (x // 7 + y // 7) % 2:
                img.putpixel((x, y), (255, 255, 255))
    return img


def test_directory_holds_custom_code_model(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURE]
    assert config["model_type"] == "tiny_minicpmv"
    assert config["auto_map"]["AutoModel"] == "modeling_tiny_minicpmv.TinyMiniCPMV"
    for ref in config["auto_map"].values():
        assert (model_dir / f"{ref.split('.')[0]}.py").is_file()
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    keys = set(index["weight_map"])
    for prefix in (
        "llm.model.embed_tokens",
        "llm.model.layers.0",
        "llm.lm_head",
        "vpm",
        "resampler",
    ):
        assert any(k.startswith(prefix + ".") for k in keys), prefix
    assert {"resampler.query", "resampler.proj"} <= keys  # bare parameters on the resampler
    assert not any(k.endswith("pos_embed") for k in keys)  # a non-persistent buffer


def test_loads_with_trust_remote_code(model_dir: Path, modules_cache: Path) -> None:
    config = tf.AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
    vision = config.vision_config
    assert (vision.image_size, vision.patch_size, vision.hidden_size) == (28, 14, 32)
    assert vision.num_hidden_layers == 2
    assert (config.query_num, config.slice_mode, config.max_slice_nums) == (4, True, 4)
    model, tokenizer = load(model_dir)
    assert type(model).__name__ == ARCHITECTURE
    assert Path(inspect.getfile(type(model))).is_relative_to(modules_cache)
    assert type(model.llm).__name__ == "LlamaForCausalLM"
    assert type(model.vpm).__name__ == "Idefics2VisionTransformer"
    assert type(model)._no_split_modules == ["LlamaDecoderLayer", "Idefics2EncoderLayer"]
    # post_init merges the submodels' own into the instance's: Idefics2's are finer ones
    assert {"LlamaDecoderLayer", "Idefics2EncoderLayer"} <= set(model._no_split_modules)
    assert model.get_input_embeddings() is model.llm.model.embed_tokens
    assert model.get_output_embeddings() is model.llm.lm_head
    assert len(tokenizer) == model.config.vocab_size
    # the buffer not in the checkpoint is rebuilt by _init_weights, not left empty
    fresh = model.resampler.compute_pos_embed()
    assert torch.equal(model.resampler.pos_embed, fresh)
    causal = tf.AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)
    # the same model code (AutoModelForCausalLM wraps a class with its own generate anew)
    assert type(causal).__qualname__ == type(model).__qualname__ == ARCHITECTURE
    assert type(causal).__module__ == type(model).__module__
    processor = tf.AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    assert type(processor).__name__ == "TinyMiniCPMVProcessor"
    assert type(processor.image_processor).__name__ == "TinyMiniCPMVImageProcessor"


def test_chat_is_deterministic_across_loads(model_dir: Path) -> None:
    answers = []
    for _ in range(2):
        model, tokenizer = load(model_dir)
        answers.append(
            model.chat(image=gradient(), msgs=MSGS, tokenizer=tokenizer, max_new_tokens=8)
        )
    assert isinstance(answers[0], str) and answers[0]
    assert answers[0] == answers[1]
    # the saved processor gives what chat builds from the config without one
    processor = tf.AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    with_processor = model.chat(
        image=gradient(), msgs=MSGS, tokenizer=tokenizer, processor=processor, max_new_tokens=8
    )
    assert with_processor == answers[0]


def test_image_changes_the_logits(model_dir: Path) -> None:
    model, tokenizer = load(model_dir)
    processor = tf.AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    msgs = [{"role": "user", "content": "(<image>./</image>)\nWhat is in the image?"}]
    prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    logits = []
    for image in (gradient(), checkers()):
        inputs = processor(prompt, [image])
        ids = inputs["input_ids"]
        assert inputs["pixel_values"].shape == (3, 3, 28, 28)  # whole image + 2 crops
        assert (ids == model.config.image_token_id).sum() == 3 * model.config.query_num
        with torch.no_grad():
            out = model(
                input_ids=ids,
                pixel_values=inputs["pixel_values"],
                image_bound=inputs["image_bound"],
                attention_mask=inputs["attention_mask"],
            )
            # without image_bound the placeholder tokens are found by id: the same result
            found = model(input_ids=ids, pixel_values=inputs["pixel_values"])
        torch.testing.assert_close(found.logits, out.logits)
        logits.append(out.logits[0, -1])
    assert not torch.allclose(logits[0], logits[1], atol=1e-3)
    answers = {
        model.chat(image=image, msgs=MSGS, tokenizer=tokenizer, max_new_tokens=8)
        for image in (gradient(), checkers(), None)
    }
    assert len(answers) == 3


@pytest.mark.parametrize("trust", [False, None])
def test_loading_without_trust_remote_code_fails(
    model_dir: Path, trust: bool | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # None would ask on stdin (15 s timeout); at 0 transformers refuses at once, as on CI
    monkeypatch.setattr("transformers.dynamic_module_utils.TIME_OUT_REMOTE_CODE", 0)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        tf.AutoModel.from_pretrained(model_dir, trust_remote_code=trust)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        tf.AutoConfig.from_pretrained(model_dir, trust_remote_code=trust)
