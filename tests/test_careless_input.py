"""Careless input ends in a typed error naming the file or field and the fix, or in a correct
result: configs with impossible sizes (checked before the meta build), architectures that are
no model class, broken generation_config.json, damaged plan files and bad --save paths,
bytes that are not UTF-8 on stdin or in -p, and chat templates that raise. On the command line
each is one `error:` line and exit 1, and with --json one {"error": ...} object on stdout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

import devicemap.model.skeleton as skeleton_module
from devicemap.errors import ConfigError, PlanError, TemplateError
from devicemap.model.config import check_sizes
from devicemap.model.skeleton import build_skeleton
from devicemap.plan.planner import Plan, plan
from devicemap.run.generate import build_prompt
from test_cli_chat import chat, reply
from test_cli_run import invoke, user
from test_generate import TEMPLATE, byte_tokenizer
from tiny import greedy_reply, make_tiny_chat

CONFIGS = Path(__file__).parent / "data" / "configs"
NEW = 4  # tokens per reply in `run`


def write_config(directory: Path, base: str = "llama-3.1-8b", **changes: Any) -> Path:
    """A copy of a real config (tests/data/configs/BASE) with `changes`; "a.b" keys change
    the sub-config a. Returns the config.json."""
    config = json.loads((CONFIGS / base / "config.json").read_text())
    for key, value in changes.items():
        *outer, last = key.split(".")
        target = config
        for part in outer:
            target = target[part]
        target[last] = value
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps(config))
    return path


def error_json(stdout: str) -> dict[str, str]:
    """The {"type", "message"} of the one JSON object `--json` prints for an error."""
    data = json.loads(stdout)
    assert list(data) == ["error"] and set(data["error"]) == {"type", "message"}
    return dict(data["error"])


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llama with a byte-level tokenizer and chat template beside it."""
    return make_tiny_chat(tmp_path_factory.mktemp("careless") / "llama", byte_tokenizer())


def with_template(model: Path, directory: Path, template: str) -> Path:
    """A copy of `model` whose tokenizer has another chat template."""
    shutil.copytree(model, directory)
    byte_tokenizer(template=template).save_pretrained(directory)
    return directory


# --- 1. config sizes, before the meta build -------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_attention_heads": 0}, "num_attention_heads is 0; it must be at least 1"),
        ({"num_key_value_heads": 0}, "num_key_value_heads is 0; it must be at least 1"),
        ({"hidden_size": -64}, "hidden_size is -64; it must be at least 1"),
        ({"head_dim": 0}, "head_dim is 0; it must be at least 1"),
        ({"num_hidden_layers": "32"}, 'num_hidden_layers is "32", not a whole number; write 32'),
        ({"num_hidden_layers": True}, "num_hidden_layers is true, not a whole number"),
        ({"intermediate_size": 14336.0}, "intermediate_size is 14336.0, not a whole number"),
        ({"num_hidden_layers": 10**9}, "num_hidden_layers is 1000000000, more than the 10000"),
        ({"hidden_size": 1 << 20, "num_hidden_layers": 5000}, "more than the memory and disks"),
    ],
)
def test_impossible_sizes_fail_before_the_model_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, changes: dict[str, Any], message: str
) -> None:
    def never(*args: Any) -> None:
        raise AssertionError("the model was built from a config with impossible sizes")

    monkeypatch.setattr(skeleton_module, "build_on_meta", never)
    path = write_config(tmp_path, **changes)
    with pytest.raises(ConfigError, match=message) as caught:
        build_skeleton(path)
    assert str(path) in str(caught.value) and "Fix these values" in str(caught.value)


def test_sub_config_sizes_are_checked_and_all_named_at_once(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        base="llava-1.5-7b",
        **{"text_config.num_attention_heads": 0, "vision_config.hidden_size": -1},
    )
    with pytest.raises(ConfigError) as caught:
        build_skeleton(path)
    text = str(caught.value)
    assert "text_config.num_attention_heads is 0" in text
    assert "vision_config.hidden_size is -1" in text


def test_sizes_as_real_configs_give_them_are_valid() -> None:
    """Per-layer lists and dicts of sizes, nulls (a default), 0 experts (dense) and head_dim 0
    beside qk_rope_head_dim (multi-head latent attention without RoPE) are all valid."""
    check_sizes(
        {
            "intermediate_size": [128, 256],
            "num_hidden_layers": {"vision": 5, "language": 9},
            "num_key_value_heads": None,
            "num_experts": 0,
            "text_config": {"head_dim": 0, "qk_rope_head_dim": 0, "hidden_size": 64},
        },
        Path("config.json"),
    )


def test_plan_json_of_a_config_with_a_billion_layers(tmp_path: Path) -> None:
    path = write_config(tmp_path, num_hidden_layers=10**9)
    result = invoke("plan", path, "--json", "--max-memory", "cpu=64GiB")
    assert result.exit_code == 1
    error = error_json(result.stdout)
    assert error["type"] == "ConfigError" and "num_hidden_layers is 1000000000" in error["message"]
    assert result.stderr == f"error: {error['message']}\n"


# --- 2. architectures and generation_config.json --------------------------------------


@pytest.mark.parametrize(
    ("architectures", "message"),
    [
        (["NotAModel"], "names 'NotAModel', which is not in transformers"),
        (["LlamaConfig"], "names 'LlamaConfig', which is not a model class in transformers"),
        (["LlamaForCausalLm"], r"\(did you mean LlamaForCausalLM\?\)"),
        ("LlamaForCausalLM", "it must be a list of model class names"),
    ],
)
def test_architectures_that_name_no_model_class(
    tmp_path: Path, architectures: Any, message: str
) -> None:
    path = write_config(tmp_path, architectures=architectures)
    with pytest.raises(ConfigError, match=message) as caught:
        build_skeleton(path)
    assert str(path) in str(caught.value) and "LlamaForCausalLM" in str(caught.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"eos_token_id": 2,', "is not valid JSON"),
        ("[1, 2]", "holds a JSON list, not an object"),
        ('{"max_new_tokens": -5}', "`max_new_tokens` must be greater than 0"),
        ('{"eos_token_id": "x"}', 'eos_token_id is "x", but token ids are whole numbers'),
    ],
)
def test_broken_generation_config_is_named_not_ignored(
    tmp_path: Path, content: str, message: str
) -> None:
    write_config(tmp_path)
    broken = tmp_path / "generation_config.json"
    broken.write_text(content)
    with pytest.raises(ConfigError, match=message) as caught:
        build_skeleton(tmp_path)
    assert str(broken) in str(caught.value)
    assert "delete it to generate with the defaults in config.json" in str(caught.value)


# --- 3. plan files --------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny llama's plan as saved JSON."""
    path = tmp_path_factory.mktemp("plans") / "plan.json"
    plan(llama, max_memory={"cpu": "1GB"}).save(path)
    return dict(json.loads(path.read_text()))


def test_damaged_plan_names_the_file_and_every_bad_field(
    saved: dict[str, Any], tmp_path: Path
) -> None:
    data = json.loads(json.dumps(saved))
    data["options"]["context"] = float("inf")  # written as JSON's Infinity
    data["max_context"] = float("nan")
    data["devices"][0]["weights"] = "12"
    data["options"]["strategy"] = "fast"
    data["device_map"]["lm_head"] = "gpu7"
    del data["exec_map"]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    assert "Infinity" in path.read_text()
    with pytest.raises(PlanError) as caught:
        Plan.load(path)
    text = str(caught.value)
    assert text.startswith(f"{path} is a damaged plan file: ")
    for problem in (
        "options.context is Infinity, not a whole number >= 1",
        "max_context is NaN, not a whole number >= 1",
        'devices[0].weights is "12", not a whole number >= 0',
        'options.strategy is "fast", not one of sequential, balanced, balanced_low_0',
        'device_map.lm_head is "gpu7", not a device',
        "exec_map is missing",
    ):
        assert problem in text
    assert text.endswith("Make it again with `devicemap plan --save`")


def test_saved_plan_still_loads(saved: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(saved))
    assert Plan.load(path).to_json() == saved


def test_run_with_a_directory_as_the_plan(llama: Path, tmp_path: Path) -> None:
    result = invoke("run", llama, "-p", "hi", "--plan", tmp_path, "--json")
    assert result.exit_code == 1
    error = error_json(result.stdout)
    assert error["type"] == "PlanError" and "is a directory" in error["message"]
    assert str(tmp_path) in error["message"]


WITH_JSON = [["plan"], ["run", "-p", "hi", "-n", "2"], ["bench", "--runs", "1"]]  # --json


@pytest.mark.parametrize("command", WITH_JSON, ids=lambda c: c[0])
def test_every_command_with_json_reports_errors_as_one_object(
    command: list[str], llama: Path, tmp_path: Path
) -> None:
    """A model that is not there and a bad option value: exit 1, the `error:` line on stderr
    and {"error": {"type", "message"}} on stdout. A value that is not one of an option's
    choices is a usage error (exit 2), refused before the command runs: nothing on stdout."""
    missing = invoke(*command, tmp_path / "nope", "--json")
    assert missing.exit_code == 1
    error = error_json(missing.stdout)
    assert error["type"] == "ModelNotFound" and str(tmp_path / "nope") in error["message"]
    assert f"error: {error['message']}\n" in missing.stderr
    bad = invoke(*command, llama, "--max-memory", "cpu=4OGiB", "--json")
    assert bad.exit_code == 1
    error = error_json(bad.stdout)
    assert error["type"] == "BadSize" and "unknown unit 'OGiB'" in error["message"]
    usage = invoke(*command, llama, "--strategy", "fast", "--json")
    assert usage.exit_code == 2 and usage.stdout == ""
    assert "'fast' is not one of" in " ".join(usage.stderr.replace("│", " ").split())


def test_save_into_a_missing_directory_or_onto_a_directory(llama: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing" / "plan.json"
    result = invoke("plan", llama, "--max-memory", "cpu=1GB", "--save", missing)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: cannot save the plan to {missing}: the directory")
    assert "does not exist" in result.stderr and len(result.stderr.splitlines()) == 1
    result = invoke("plan", llama, "--max-memory", "cpu=1GB", "--save", tmp_path, "--json")
    assert result.exit_code == 1
    assert error_json(result.stdout)["message"].endswith(f"such as {tmp_path / 'plan.json'}")
    assert list(tmp_path.iterdir()) == []  # nothing written, no temp file left


# --- 4. text that is not UTF-8, chat templates that raise -----------------------------


def test_chat_stdin_that_is_not_utf8_goes_on(llama: Path) -> None:
    result = chat(llama, b"caf\xe9\nhello\n")  # type: ignore[arg-type]  # CliRunner takes bytes
    assert result.exit_code == 0
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: the message is not valid UTF-8: 1 byte replaced by U+FFFD (\ufffd)"
    ]
    first = reply(llama, user("caf\ufffd")[0])
    history = [*user("caf\ufffd"), {"role": "assistant", "content": first}, *user("hello")]
    assert result.stdout == f"{first}\n{reply(llama, *history)}\n"


def test_prompt_with_surrogate_escapes(llama: Path) -> None:
    result = invoke("run", llama, "-p", "caf\udce9", "-n", NEW)  # how Python reads b"caf\xe9"
    assert result.exit_code == 0
    assert "warning: the prompt is not valid UTF-8: 1 byte replaced" in result.stderr
    assert result.stdout == greedy_reply(llama, user("caf\ufffd"), max_new_tokens=NEW) + "\n"


NO_SYSTEM = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}" + TEMPLATE
)


def test_template_without_system_role(llama: Path, tmp_path: Path) -> None:
    model = with_template(llama, tmp_path / "no-system", NO_SYSTEM)
    result = invoke("run", model, "-p", "hi", "--system", "Be brief.", "--json")
    assert result.exit_code == 1
    error = error_json(result.stdout)
    assert error["type"] == "TemplateError"
    assert error["message"].startswith(
        "this model's chat template does not support a system prompt: omit --system"
    )
    assert result.stderr == f"error: {error['message']}\n"
    result = invoke("run", model, "-p", "hi", "-n", NEW)  # without --system it answers
    assert result.stdout == greedy_reply(model, user("hi"), max_new_tokens=NEW) + "\n"


def test_template_syntax_error_suggests_raw(llama: Path, tmp_path: Path) -> None:
    model = with_template(llama, tmp_path / "syntax", "{% for m in messages %}{{ m['content'] }")
    result = invoke("run", model, "-p", "hi", "-n", NEW)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: the model's chat template is not valid Jinja")
    assert "--raw" in result.stderr and len(result.stderr.splitlines()) == 1
    result = invoke("run", model, "-p", "hi", "-n", NEW, "--raw")
    assert result.exit_code == 0
    assert result.stdout == greedy_reply(model, user("hi"), max_new_tokens=NEW, raw=True) + "\n"


def test_template_error_in_chat_keeps_the_session(llama: Path, tmp_path: Path) -> None:
    refuses = "{% if 'secret' in messages[-1]['content'] %}{{ raise_exception('no secrets') }}"
    model = with_template(llama, tmp_path / "refuses", refuses + "{% endif %}" + TEMPLATE)
    result = chat(model, "a secret\nhello\n")
    assert result.exit_code == 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: the model's chat template failed on these messages (no secrets); feed the"
        " prompt without the template: raw=True (--raw on `devicemap run`)"
    ]
    assert result.stdout == reply(model, *user("hello")) + "\n"  # the refused turn is not kept


def test_build_prompt_raises_template_error() -> None:
    tokenizer = byte_tokenizer(template=NO_SYSTEM)
    with pytest.raises(TemplateError, match="does not support a system prompt"):
        build_prompt(tokenizer, [{"role": "system", "content": "x"}, *user("hi")])
    assert build_prompt(tokenizer, "caf\udce9").shape[-1] > 0  # replaced, not a TypeError


# --- found by a hostile review: saving over files, cache names, odd files ---------------


def test_save_never_replaces_a_model_file_or_a_special_file(llama: Path, tmp_path: Path) -> None:
    import os

    model = tmp_path / "model"
    shutil.copytree(llama, model)
    for victim in (model / "config.json", next(model.glob("*.safetensors"))):
        before = victim.read_bytes()
        result = invoke("plan", model, "--max-memory", "cpu=1GB", "--save", victim)
        assert result.exit_code == 1 and "is not a devicemap plan" in result.stderr
        assert victim.read_bytes() == before
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result = invoke("plan", model, "--max-memory", "cpu=1GB", "--save", fifo)
    assert result.exit_code == 1 and "not a regular file" in result.stderr
    assert fifo.is_fifo()
    plan_file = tmp_path / "plan.json"  # a plan is replaced by the new plan, as before
    for _ in range(2):
        assert invoke("plan", model, "--max-memory", "cpu=1GB", "--save", plan_file).exit_code == 0


def test_a_plan_path_that_is_a_fifo_or_huge_is_refused_not_read(
    llama: Path, tmp_path: Path
) -> None:
    import os

    fifo = tmp_path / "plan.fifo"
    os.mkfifo(fifo)
    result = invoke("run", llama, "-p", "hi", "--plan", fifo)
    assert result.exit_code == 1 and "not a regular file" in result.stderr
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:
        f.truncate((64 << 20) + 1)  # sparse: no disk used
    result = invoke("run", llama, "-p", "hi", "--plan", huge)
    assert result.exit_code == 1 and "more than any plan" in result.stderr


def test_cache_rm_with_an_empty_name_deletes_nothing(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from devicemap.cli.cache import app as cache_app

    directory = tmp_path / "offload"
    directory.mkdir()
    (directory / ("a" * 32 + ".safetensors")).write_bytes(b"x")
    (directory / "x.safetensors.tmp-999999-00bb").mkdir()  # a directory with a temp's name
    for name in ("", " "):
        result = CliRunner().invoke(cache_app, ["rm", name, "--dir", str(directory)])
        assert result.exit_code == 1 and "empty name" in result.output
    assert len(list(directory.iterdir())) == 2
    result = CliRunner().invoke(cache_app, ["rm", "--all", "--dir", str(directory)])
    assert result.exit_code == 0 and result.exception is None  # the directory is left alone
    result = CliRunner().invoke(cache_app, ["ls", "--dir", str(tmp_path / "missing")])
    assert result.exit_code == 0  # a missing directory: nothing cached


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hidden_act": "not_an_act"}, "cannot be built from this config (KeyError: 'not_an_act')"),
        ({"pad_token_id": 10**6}, "Padding_idx must be within num_embeddings"),
        ({"torch_dtype": "int8", "dtype": "int8"}, "is 'int8', not a dtype weights are planned in"),
    ],
)
def test_config_values_only_the_model_refuses_are_config_errors(
    changes: dict[str, Any], message: str, tmp_path: Path
) -> None:
    path = write_config(tmp_path / "bad", **changes)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_skeleton(path)


def test_a_config_nested_too_deeply(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="nested too deeply"):
        build_skeleton(tmp_path / "config.json")


@pytest.mark.parametrize(
    "template",
    ["{% for i in range(10**11) %}{% endfor %}", "{{ 'abc' | truncate(-5) }}"],
)
def test_templates_that_fail_inside_jinja_are_template_errors(template: str) -> None:
    with pytest.raises(TemplateError, match="--raw"):
        build_prompt(byte_tokenizer(template=template), "hi")


def test_an_image_that_is_a_fifo_or_a_bomb_is_bad_image(tmp_path: Path) -> None:
    import os

    from PIL import Image

    from devicemap.cli.commands import open_images
    from devicemap.errors import BadImage

    fifo = tmp_path / "img.fifo"
    os.mkfifo(fifo)
    with pytest.raises(BadImage, match="not a regular file"):
        open_images([str(fifo)])
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400 Mpx: over PIL's bomb limit
    with pytest.raises(BadImage, match="too large to decode safely"):
        open_images([str(bomb)])


def test_a_template_that_runs_on_or_writes_gigabytes_is_a_template_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from devicemap.run import generate

    monkeypatch.setattr(generate, "TEMPLATE_SECONDS", 0.2)
    slow = "{% for i in range(100000) %}{% for j in range(100) %}{% endfor %}{% endfor %}"
    with pytest.raises(TemplateError, match="still running after 0 s"):
        build_prompt(byte_tokenizer(template=slow), "hi")  # (it ends by itself in seconds)
    monkeypatch.setattr(generate, "TEMPLATE_SECONDS", 20.0)
    huge = "{{ 'x' * 20000000 }}"
    with pytest.raises(TemplateError, match="a prompt of 20000000 characters"):
        build_prompt(byte_tokenizer(template=huge), "hi")


def test_an_empty_model_name_is_not_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from devicemap.errors import ModelNotFound
    from devicemap.load.cache import default_dir

    monkeypatch.chdir(tmp_path)
    for name in ("", "  "):
        with pytest.raises(ModelNotFound, match="the model name is empty"):
            build_skeleton(name)
    monkeypatch.setenv("DEVICEMAP_CACHE", "")  # set but empty: as if unset, not ./offload
    assert default_dir() != Path("offload") and default_dir().is_absolute()


def test_a_plan_edited_or_made_before_the_config_changed_says_so(
    saved: dict[str, Any], llama: Path
) -> None:
    from devicemap.errors import PlanMismatch
    from devicemap.plan.planner import plan_from_json

    edited = plan_from_json({**saved, "fingerprint": "0" * 64})
    with pytest.raises(PlanMismatch, match="or the plan file was edited"):
        edited.check(build_skeleton(llama))
