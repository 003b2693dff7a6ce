"""Custom-code models end to end: the MiniCPM-V-style fixture (tests/custom_vlm.py) planned,
loaded split across devices and chatting exactly like plain transformers; `--trust-remote-code`
on the command line; `--image` for vision-language models; the vision tower's workspace."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from PIL import Image
from typer.testing import CliRunner

import devicemap
from custom_vlm import isolated_modules_cache, make_tiny_minicpmv
from devicemap.cli.main import app
from devicemap.errors import BadImage, RemoteCodeNotTrusted
from devicemap.model.skeleton import build_skeleton
from devicemap.plan.planner import plan_from_json

MSGS = [{"role": "user", "content": "What is in the picture?"}]
# the seed's pins: embeddings, the first layer, the LM head, the vision tower and resampler
# together (on GPU 0 in the seed; here, without a GPU, on cpu), the rest across cpu and disk
SEED_PINS = ("llm.model.embed_tokens", "llm.model.layers.0", "llm.lm_head", "vpm", "resampler")


@pytest.fixture(scope="module")
def vlm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with isolated_modules_cache(tmp_path_factory.mktemp("hf_modules")):
        yield make_tiny_minicpmv(tmp_path_factory.mktemp("vlm") / "tiny-minicpmv")


def picture() -> Image.Image:
    """56x28: the whole image and 2 crops go through the vision tower."""
    data = bytes(v for y in range(28) for x in range(56) for v in (x * 4, y * 9, (x + y) * 3 % 256))
    return Image.frombytes("RGB", (56, 28), data)


def plain(vlm: Path) -> tuple[Any, Any]:
    tokenizer = tf.AutoTokenizer.from_pretrained(vlm, trust_remote_code=True)
    return tf.AutoModel.from_pretrained(vlm, trust_remote_code=True).eval(), tokenizer


def split_plan(vlm: Path) -> Any:
    pins = dict.fromkeys(SEED_PINS, "cpu")
    pins.update(
        {"llm.model.layers.2": "disk", "llm.model.layers.3": "disk", "llm.model.norm": "disk"}
    )
    return devicemap.plan(
        vlm,
        max_memory={"cpu": "1GiB", "disk": "1GiB"},
        pins=pins,
        offload_exec="cpu",
        context=128,
        trust_remote_code=True,
    )


def test_without_trust_no_code_runs_and_the_error_names_the_files(vlm: Path) -> None:
    with pytest.raises(RemoteCodeNotTrusted) as info:
        devicemap.plan(vlm, max_memory={"cpu": "1GiB"})
    message = str(info.value)
    assert str(vlm / "modeling_tiny_minicpmv.py") in message
    assert "trust_remote_code=True" in message and "--trust-remote-code" in message
    with pytest.raises(RemoteCodeNotTrusted):
        devicemap.load(vlm, max_memory={"cpu": "1GiB"}, progress=False)


def test_the_seed_split_chats_exactly_like_transformers(vlm: Path) -> None:
    reference, tokenizer = plain(vlm)
    expected = reference.chat(image=picture(), msgs=MSGS, tokenizer=tokenizer, max_new_tokens=8)
    plan = split_plan(vlm)
    pinned = [k for k in plan.device_map for p in SEED_PINS if k == p or k.startswith(p + ".")]
    assert len(pinned) >= len(SEED_PINS) and {plan.device_map[k] for k in pinned} == {"cpu"}
    assert plan.device_map["resampler"] == "cpu"  # its bare `query` parameter with it
    assert plan.device_map["llm.model.layers.3"] == "disk"
    with devicemap.releasing(
        devicemap.load(vlm, plan=plan, trust_remote_code=True, progress=False)
    ) as model:
        got = model.chat(image=picture(), msgs=MSGS, tokenizer=tokenizer, max_new_tokens=8)
        assert got == expected
        no_image = model.chat(image=None, msgs=MSGS, tokenizer=tokenizer, max_new_tokens=8)
        want = reference.chat(image=None, msgs=MSGS, tokenizer=tokenizer, max_new_tokens=8)
        assert no_image == want


def test_the_vision_tower_workspace_is_counted_per_image(vlm: Path) -> None:
    skeleton = build_skeleton(vlm, trust_remote_code=True)
    vision = [b for b in skeleton.blocks if b.image_tokens]
    assert vision and all(b.name.startswith("vpm.") for b in vision)
    # 28-pixel images in 14-pixel patches: 4 patches + 1, for the whole image and 4 slices
    assert {b.image_tokens for b in vision} == {(4 + 1) * (4 + 1)}
    one, four = (
        devicemap.plan(skeleton, max_memory={"cpu": "1GiB"}, context=16, images=n) for n in (1, 4)
    )
    assert one.options.images == 1 and four.options.images == 4
    widest = max(b.act_bytes_per_token * b.image_tokens for b in vision)
    assert four.usage("cpu").workspace >= 4 * widest > one.usage("cpu").workspace - 1
    assert any("vision tower" in line and "patches per image x 4" in line for line in four.reasons)
    assert plan_from_json(four.to_json()).options.images == 4


# --- the command line ------------------------------------------------------------------


def cli(*args: Any) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def run_with_image(model: Path, photo: Path, prompt: str, new: int, pin: str, *extra: Any) -> Any:
    """`devicemap run MODEL --image PHOTO --json`, cpu + disk (PIN), offloaded blocks on cpu."""
    result = cli(
        "run",
        model,
        *extra,
        "--image",
        photo,
        "-p",
        prompt,
        "-n",
        new,
        "-m",
        "cpu=1GiB",
        "-m",
        "disk=1GiB",
        "--pin",
        pin,
        "--offload-exec",
        "cpu",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_cli_refuses_custom_code_without_the_flag(vlm: Path) -> None:
    for command in ("plan", "run"):
        extra = ["-p", "hi"] if command == "run" else []
        result = cli(command, vlm, *extra)
        assert result.exit_code == 1, result.output
        assert (
            "--trust-remote-code" in result.stderr and "modeling_tiny_minicpmv.py" in result.stderr
        )
        assert "Traceback" not in result.output


def test_cli_plans_a_custom_model_with_trust(vlm: Path) -> None:
    result = cli("plan", vlm, "--trust-remote-code", "-m", "cpu=1GiB", "--json")
    assert result.exit_code == 0, result.stderr
    placed = json.loads(result.stdout)["device_map"]
    assert "resampler" in placed and "vpm.encoder.layers.0" in placed


def test_cli_run_with_an_image_answers_like_transformers(vlm: Path, tmp_path: Path) -> None:
    reference, tokenizer = plain(vlm)
    expected = reference.chat(image=picture(), msgs=MSGS, tokenizer=tokenizer, max_new_tokens=6)
    photo = tmp_path / "photo.png"
    picture().save(photo)
    reply = run_with_image(
        vlm, photo, MSGS[0]["content"], 6, "llm.model.layers.3=disk", "--trust-remote-code"
    )
    assert reply["reply"] == expected
    assert reply["device_map"]["llm.model.layers.3"] == "disk"


def test_cli_image_that_does_not_decode_names_the_file(vlm: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = cli("run", vlm, "--trust-remote-code", "--image", broken, "-p", "hi")
    assert result.exit_code == 1
    assert re.search(rf"--image {re.escape(str(broken))}: not an image", result.stderr)
    missing = cli("run", vlm, "--trust-remote-code", "--image", tmp_path / "nope.png", "-p", "hi")
    assert missing.exit_code == 1 and "no such file" in missing.stderr


def test_open_images_raises_a_typed_error(tmp_path: Path) -> None:
    from devicemap.cli.commands import open_images

    (tmp_path / "x.png").write_text("text")
    with pytest.raises(BadImage, match=re.escape("x.png")):
        open_images([str(tmp_path / "x.png")])
    image = Image.new("RGB", (3, 2), (1, 2, 3))
    image.save(tmp_path / "ok.png")
    [decoded] = open_images([str(tmp_path / "ok.png")])
    assert decoded.size == (3, 2) and torch.tensor(decoded.getpixel((0, 0))).tolist() == [1, 2, 3]


def test_image_for_a_text_model_is_a_clear_error(tmp_path: Path) -> None:
    from test_generate import byte_tokenizer
    from tiny import make_tiny_chat

    model = make_tiny_chat(tmp_path / "text", byte_tokenizer())
    image = tmp_path / "ok.png"
    Image.new("RGB", (4, 4)).save(image)
    result = cli("run", model, "--image", image, "-p", "hi", "-n", 2)
    assert result.exit_code == 1 and "--image needs a vision-language model" in result.stderr


# --- a standard transformers VLM with its processor --------------------------------------

LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaVA with a processor (CLIP image processor, tokenizer, chat template)."""
    from test_generate import byte_tokenizer
    from tiny import tiny_config

    directory = tmp_path_factory.mktemp("llava") / "tiny-llava"
    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    config = tiny_config("llava")
    config.text_config.vocab_size = len(tokenizer)
    config.image_token_index = config.image_token_id = image_token
    torch.manual_seed(0)
    model = tf.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 1)
    model.save_pretrained(directory, max_shard_size="100KB")
    processor = tf.LlavaProcessor(
        image_processor=tf.CLIPImageProcessor(
            size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
        ),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    processor.save_pretrained(directory)
    return directory


def test_cli_run_with_an_image_on_a_transformers_vlm(llava: Path, tmp_path: Path) -> None:
    processor = tf.AutoProcessor.from_pretrained(llava)
    model = tf.LlavaForConditionalGeneration.from_pretrained(llava).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=text, images=[picture()], return_tensors="pt", add_special_tokens=False)
    assert (inputs["input_ids"] == model.config.image_token_index).sum() == 4  # 2 x 2 patches
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    expected = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    photo = tmp_path / "photo.png"
    picture().save(photo)
    reply = run_with_image(llava, photo, "hi", 5, "model.vision_tower=disk")
    assert reply["reply"] == expected
    assert reply["device_map"]["model.vision_tower.encoder.layers.0"] == "disk"
