"""`devicemap plan` through typer's CliRunner: tables, --json, --save, --explain, errors."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import get_args

import pytest
import torch
import typer
from typer.testing import CliRunner

import devicemap
from devicemap.cli.main import app
from devicemap.cli.options import (
    DTYPE_ALIASES,
    PLANNING,
    PlanChoices,
    dtype_choice,
    options_from,
    parse_gpus,
)
from devicemap.cli.tables import short_size, usage_bar
from devicemap.model.config import DTYPES
from devicemap.model.skeleton import build_skeleton
from devicemap.plan.options import Dtype
from devicemap.plan.planner import Plan

LLAMA_70B = str(Path(__file__).parent / "data" / "configs" / "llama-3-70b")
WHAT_IF = ["--max-memory", "0=40GiB", "--max-memory", "1=40GiB", "--max-memory", "cpu=64GiB"]
DONE_WHEN = ["plan", LLAMA_70B, *WHAT_IF, "--context", "8192"]
DEVICE_KEYS = {"device", "budget", "weights", "kv_cache", "workspace", "free"}


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: str):
    return runner.invoke(app, list(args), env={"COLUMNS": "120"})


def test_help_lists_the_plan_command(runner):
    result = invoke(runner, "--help")
    assert result.exit_code == 0 and "plan" in result.stdout
    result = invoke(runner, "plan", "--help")
    for option in ("--max-memory", "--gpus", "--context", "--batch", "--dtype", "--strategy"):
        assert option in result.stdout
    for option in ("--pin", "--save", "--json", "--explain", "--offload-exec"):
        assert option in result.stdout


def test_done_when_what_if_plan_prints_tables_within_budget(runner):
    result = invoke(runner, *DONE_WHEN)
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "context 8192 x batch 1" in out
    rows: dict[str, list[str]] = {}
    for line in out.splitlines():  # the first row naming a device is its memory row
        if line.strip():
            rows.setdefault(line.split()[0], line.split())
    for device in ("cuda:0", "cuda:1", "cpu"):
        assert device in rows
    assert rows["cuda:0"][1] == "40G" and rows["cpu"][1] == "64G"
    assert rows["cuda:0"][3] != "0" and rows["cuda:1"][3] != "0"  # KV on both GPUs
    assert "model.layers." in out and "lm_head" in out and "█" in out


def test_done_when_json_has_the_required_keys_and_loads_back(runner, tmp_path):
    result = invoke(runner, *DONE_WHEN, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)  # stdout holds only the JSON object
    assert {"device_map", "devices", "max_context"} <= set(data)
    assert [d["device"] for d in data["devices"]] == ["cuda:0", "cuda:1", "cpu"]
    for entry in data["devices"]:
        assert set(entry) >= DEVICE_KEYS
        assert entry["weights"] + entry["kv_cache"] + entry["workspace"] <= entry["budget"]
        assert entry["used"] <= entry["budget"] and entry["free"] >= 0
    assert data["devices"][0]["kv_cache"] > 0 and data["devices"][1]["kv_cache"] > 0
    assert data["max_context"] >= 8192
    assert len(data["device_map"]) == 84  # embed, rotary, 80 layers, norm, lm_head
    path = tmp_path / "printed.json"
    path.write_text(result.stdout)
    loaded = Plan.load(path)
    assert loaded.device_map == data["device_map"]
    assert loaded.to_json() == data


def test_save_writes_a_plan_that_loads(runner, tmp_path):
    path = tmp_path / "plan.json"
    result = invoke(runner, *DONE_WHEN, "--save", str(path), "--strategy", "sequential")
    assert result.exit_code == 0, result.stderr
    assert f"plan saved to {path}" in result.stderr
    loaded = Plan.load(path)
    assert loaded.options.strategy == "sequential" and loaded.options.context == 8192
    assert loaded.usage(0).kv_cache > 0


def test_explain_and_pins(runner):
    result = invoke(
        runner, *DONE_WHEN, "--explain", "--pin", "lm_head=1", "--pin", "model.norm=cuda:1"
    )
    assert result.exit_code == 0, result.stderr
    assert "pin lm_head -> cuda:1: lm_head" in result.stdout
    assert "did not fit in what cuda:0 had left" in result.stdout
    data = json.loads(invoke(runner, *DONE_WHEN, "--json", "--pin", "lm_head=1").stdout)
    assert data["device_map"]["lm_head"] == 1


def test_tiny_model_on_cpu_only(runner, tiny_models):
    result = invoke(runner, "plan", str(tiny_models["qwen2"]), "-m", "cpu=1GiB", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data["device_map"].values()) == {"cpu"}
    assert set(data["exec_map"].values()) == {"cpu"}
    assert data["options"]["context"] == 512  # the tiny model's max positions


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-m", "40GiB"], "--max-memory '40GiB': write KEY=VALUE"),
        (["-m", "0=4OGiB"], "unknown unit 'OGiB'"),
        (["-m", "0=1GiB", "-m", "0=2GiB"], "gives device '0' twice"),
        (["-m", "0=1GiB", "-m", "cuda:0=2GiB"], "are both cuda:0"),
        (["-m", "tpu=1GiB"], "unknown device 'tpu'"),
        (["-m", "0=40GiB", "--pin", "lm_haed=0", "--pin", "model.layer=0"], "'lm_head'"),
        (["-m", "0=40GiB", "--pin", "lm_head"], "--pin 'lm_head': write KEY=VALUE"),
        (["-m", "0=40GiB", "--pin", "lm_head=0", "--pin", "lm_head=1"], "more than once"),
        (["-m", "0=40GiB", "--pin", "lm_head=cpu"], "cpu has no budget"),
        (["-m", "0=40GiB", "-m", "cpu=64GiB"], "short. To make it fit: add --max-memory disk="),
        (["-m", "0=40GiB", "--context", "100000"], "longer than"),
        (["--gpus", "9"], "asks for more GPUs than this machine has"),
    ],
)
def test_bad_input_is_one_line_on_stderr_and_exit_1(runner, args, message):
    result = invoke(runner, "plan", LLAMA_70B, *args)
    assert result.exit_code == 1
    assert message in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.output and result.stdout == ""


CHOICES = {
    "--strategy": ("sequential", "balanced", "balanced_low_0"),
    "--offload-exec": ("gpu", "cpu"),
    "--logits": ("last", "all"),
    "--dtype": ("auto", "bfloat16", "float16", "float32"),
}


def test_help_lists_each_options_choices(runner):
    result = invoke(runner, "plan", "--help")
    assert result.exit_code == 0
    for option, choices in CHOICES.items():
        assert option in result.stdout and all(choice in result.stdout for choice in choices)


@pytest.mark.parametrize("option", list(CHOICES))
def test_a_value_not_among_the_choices_is_a_usage_error_naming_them(runner, option):
    result = invoke(runner, "plan", LLAMA_70B, "-m", "0=40GiB", option, "fast", "--json")
    assert result.exit_code == 2  # a usage error, before anything is planned
    assert result.stdout == "" and "Traceback" not in result.output
    said = " ".join(result.stderr.replace("│", " ").split())  # rich's box, wrapped lines
    assert f"Invalid value for '{option}'" in said and "'fast' is not one of" in said
    assert all(f"'{choice}'" in said for choice in CHOICES[option])


def test_dtype_auto_is_the_checkpoints_dtype_as_leaving_it_out(runner):
    """--dtype auto, no --dtype and devicemap.plan(dtype="auto") make the same plan; the
    aliases plan() knows (bf16, FP16, torch.float32) are taken on the command line too."""
    plans = [json.loads(invoke(runner, *DONE_WHEN, *dtype, "--json").stdout)
             for dtype in ([], ["--dtype", "auto"], ["--dtype", "AUTO"])]  # fmt: skip
    assert plans[0] == plans[1] == plans[2] and plans[0]["dtype"] == "bfloat16"  # config's
    budgets = {0: "40GiB", 1: "40GiB", "cpu": "64GiB"}
    library = devicemap.plan(LLAMA_70B, max_memory=budgets, context=8192, dtype="auto")
    assert library.to_json() == plans[0]
    disk = ["-m", "disk=2TiB"]  # float32 70B spills past the GPUs and RAM
    for alias, name in (("bf16", "bfloat16"), ("FP16", "float16"), ("torch.float32", "float32")):
        given = json.loads(invoke(runner, *DONE_WHEN, *disk, "--dtype", alias, "--json").stdout)
        assert given["dtype"] == name
        named = invoke(runner, *DONE_WHEN, *disk, "--dtype", name, "--json")
        assert given == json.loads(named.stdout)


def test_dtype_aliases_are_the_ones_the_config_parser_knows():
    for alias, dtype in DTYPES.items():
        assert DTYPES[dtype_choice(alias)] == dtype
    assert set(DTYPES) == {*DTYPE_ALIASES, *get_args(Dtype)} - {"auto"}


def test_missing_model_is_a_clear_error(runner, tmp_path):
    result = invoke(runner, "plan", str(tmp_path / "nope"), "-m", "cpu=1GiB")
    assert result.exit_code == 1 and "nope" in result.stderr and "Traceback" not in result.output


def test_helpers():
    assert parse_gpus(None) is None and parse_gpus("2") == 2 and parse_gpus("0, 1") == ["0", "1"]
    assert [short_size(n) for n in (0, 12, 1536, 40 * 2**30, 736 * 2**20)] == [
        "0",
        "12B",
        "1.5K",
        "40G",
        "736M",
    ]
    assert usage_bar(1, 2, width=4) == "██░░  50%"
    assert usage_bar(0, 0, width=2) == "░░   0%"


def test_options_from_puts_the_plan_choices_in_the_signature_and_packs_them_back():
    seen: list[tuple[str, PlanChoices, bool]] = []
    tiny = typer.Typer()

    @tiny.command()
    @options_from(planning=PlanChoices)
    def show(model: str, *, planning: PlanChoices, loud: bool = False) -> None:
        seen.append((model, planning, loud))

    assert list(inspect.signature(show).parameters) == ["model", *PLANNING, "loud"]
    result = CliRunner().invoke(tiny, ["m", "-b", "3", "--pin", "lm_head=0", "--gpus", "0,1"])
    assert result.exit_code == 0, result.output
    assert seen == [("m", PlanChoices(gpus="0,1", batch=3, pin=["lm_head=0"]), False)]


def test_plan_choices_make_plan_the_users_context_wins_and_a_skeleton_keeps_its_dtype():
    budgets = WHAT_IF[1::2]  # 0=40GiB, 1=40GiB, cpu=64GiB
    defaulted = PlanChoices(max_memory=budgets).make_plan(LLAMA_70B, context=1024)
    assert defaulted.options.context == 1024
    given = PlanChoices(max_memory=budgets, context=2048, strategy="sequential")
    made = given.make_plan(LLAMA_70B, context=1024)
    assert made.options.context == 2048 and made.options.strategy == "sequential"
    skeleton = build_skeleton(LLAMA_70B, dtype="float16")
    made = PlanChoices(max_memory=budgets, dtype="float32").make_plan(skeleton, context=1024)
    assert made.dtype == torch.float16  # --dtype went into the skeleton, not into plan() again


# --- --device-map: an accelerate/transformers map file ------------------------------------


def test_a_device_map_file_pins_like_pin_and_widens_sub_block_entries_with_a_warning(
    runner, tmp_path: Path
):
    what_if = [LLAMA_70B, *WHAT_IF, "--context", "1024", "--json"]
    pins = {"model.layers.0": 1, "lm_head": "cpu", "model.norm": "cpu"}
    path = tmp_path / "map.json"
    path.write_text(json.dumps(pins))
    by_file = invoke(runner, "plan", *what_if, "--device-map", str(path))
    flags = [f"--pin={k}={v}" for k, v in pins.items()]
    by_pin = invoke(runner, "plan", *what_if, *flags)
    assert by_file.exit_code == 0 and by_pin.exit_code == 0, by_file.stderr
    assert json.loads(by_file.stdout)["device_map"] == json.loads(by_pin.stdout)["device_map"]
    assert json.loads(by_file.stdout)["device_map"]["model.layers.0"] == 1
    assert "widened" not in by_file.stderr

    path.write_text(json.dumps({"model.layers.3.mlp": "cpu", "model.layers.3.self_attn": "cpu"}))
    widened = invoke(runner, "plan", *what_if, "--device-map", str(path))
    assert widened.exit_code == 0, widened.stderr
    assert json.loads(widened.stdout)["device_map"]["model.layers.3"] == "cpu"
    assert "model.layers.3.mlp -> model.layers.3" in widened.stderr
    assert "model.layers.3.self_attn -> model.layers.3" in widened.stderr

    path.write_text(json.dumps({"": "cpu"}))  # accelerate's whole model on one device
    whole = invoke(runner, "plan", LLAMA_70B, "--max-memory", "cpu=200GiB", "--context",
                   "1024", "--json", "--device-map", str(path))  # fmt: skip
    assert whole.exit_code == 0, whole.stderr
    assert set(json.loads(whole.stdout)["device_map"].values()) == {"cpu"}


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "no such file"),
        ("{not json", "not readable JSON"),
        ("[1, 2]", "not a non-empty JSON object"),
        ('{"lm_head": [0]}', "entries 'lm_head' name no device"),
    ],
)
def test_a_bad_device_map_file_is_one_error_naming_it(runner, tmp_path: Path, content, says):
    path = tmp_path / "map.json"
    if content is not None:
        path.write_text(content)
    result = invoke(runner, "plan", LLAMA_70B, *WHAT_IF, "--device-map", str(path))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: --device-map {path}: {says}")
    both = tmp_path / "both.json"
    both.write_text('{"lm_head": "cpu"}')
    result = invoke(runner, "plan", LLAMA_70B, *WHAT_IF, "--device-map", str(both),
                    "--pin", "lm_head=0")  # fmt: skip
    assert result.exit_code == 1 and "in both --pin and --device-map" in result.stderr
