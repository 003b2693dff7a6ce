"""`devicemap run` through typer's test runner: replies equal plain transformers, every bad input
is one line and a non-zero exit; the demo model split between CPU and disk answers as
transformers does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from devicemap.cli import demo
from devicemap.cli.main import app
from devicemap.errors import ModelNotFound
from test_generate import byte_tokenizer
from tiny import greedy_reply, make_tiny_chat

PROMPT = "Where do the layers go?"
SPLIT = ["--max-memory", "cpu=600KB", "--max-memory", "disk=1GB"]  # tiny llama: cpu + disk


def invoke(*args: Any, input: str | None = None) -> Result:
    """Run `devicemap ARGS`; never a traceback, whatever the exit status."""
    result = CliRunner().invoke(app, [str(a) for a in args], input=input)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llama with a byte-level tokenizer and chat template beside it."""
    return make_tiny_chat(tmp_path_factory.mktemp("run") / "llama", byte_tokenizer())


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_chat(tmp_path_factory.mktemp("run") / "qwen2", byte_tokenizer(), arch="qwen2")


# --- replies -----------------------------------------------------------------------


def test_greedy_run_streams_the_transformers_reply(llama: Path) -> None:
    result = invoke("run", llama, "-p", PROMPT, "--max-new-tokens", 12)
    assert result.exit_code == 0
    assert result.stdout == greedy_reply(llama, user(PROMPT), max_new_tokens=12) + "\n"
    lines = result.stderr.splitlines()
    assert lines[0].startswith("planned in ") and "cpu: 8 blocks (run on cpu)" in lines[0]
    assert lines[1].startswith("loaded in ")
    assert "12 tokens, prefill" in lines[-1] and "tok/s; cpu: 8 blocks" in lines[-1]


def test_run_split_between_cpu_and_disk_as_json(llama: Path) -> None:
    result = invoke("run", llama, "-p", PROMPT, "-n", 10, "--json", *SPLIT)
    assert result.exit_code == 0
    out = json.loads(result.stdout)  # stdout holds the JSON object and nothing else
    assert out["reply"] == greedy_reply(llama, user(PROMPT), max_new_tokens=10)
    assert out["prompt"] == PROMPT and out["new_tokens"] == 10 and out["finish_reason"] == "length"
    assert out["placement"]["cpu"] >= 1 and out["placement"]["disk"] >= 1
    assert sum(out["placement"].values()) == len(out["device_map"]) == 8
    assert set(out["exec_map"].values()) == {"cpu"}
    timings = out["timings"]
    assert timings["load_s"] > 0 and timings["prefill_s"] > 0 and timings["decode_tok_s"] > 0
    assert "planned in" in result.stderr  # progress still goes to stderr


def test_raw_skips_the_chat_template(llama: Path) -> None:
    templated = json.loads(invoke("run", llama, "-p", "hello", "-n", 6, "--json").stdout)
    raw = json.loads(invoke("run", llama, "-p", "hello", "-n", 6, "--json", "--raw").stdout)
    assert raw["prompt_tokens"] == len(b"hello")  # one token per byte, no template around it
    assert templated["prompt_tokens"] == len("<s>user: hello\n<s>assistant:") - 2 * 2  # <s> = 1
    assert raw["reply"] == greedy_reply(llama, user("hello"), max_new_tokens=6, raw=True)


def test_system_message_goes_through_the_template(llama: Path) -> None:
    out = json.loads(
        invoke("run", llama, "-p", "hi", "-n", 6, "--json", "--system", "Be brief.").stdout
    )
    messages = [{"role": "system", "content": "Be brief."}, *user("hi")]
    assert out["reply"] == greedy_reply(llama, messages, max_new_tokens=6)


def test_sampling_with_a_seed_is_reproducible(llama: Path) -> None:
    flags = ["--temperature", 0.9, "--top-p", 0.95, "--top-k", 50, "--repetition-penalty", 1.1]

    def sample(seed: int) -> str:
        result = invoke("run", llama, "-p", PROMPT, "-n", 16, "--json", *flags, "--seed", seed)
        assert result.exit_code == 0
        return str(json.loads(result.stdout)["reply"])

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first
    assert first != greedy_reply(llama, user(PROMPT), max_new_tokens=16)


def test_prompt_from_stdin(llama: Path) -> None:
    result = invoke("run", llama, "-p", "-", "-n", 5, input=PROMPT)
    assert result.stdout == greedy_reply(llama, user(PROMPT), max_new_tokens=5) + "\n"


# --- saved plans -------------------------------------------------------------------


def test_saved_plan_is_reused_without_planning(llama: Path, tmp_path: Path) -> None:
    saved = tmp_path / "plan.json"
    planned = invoke("plan", llama, *SPLIT, "--context", 128, "--save", saved)
    assert planned.exit_code == 0
    plan = json.loads(saved.read_text())
    result = invoke("run", llama, "-p", PROMPT, "-n", 8, "--json", "--plan", saved)
    assert result.exit_code == 0
    out = json.loads(result.stdout)
    assert out["device_map"] == plan["device_map"] and "disk" in out["device_map"].values()
    assert out["reply"] == greedy_reply(llama, user(PROMPT), max_new_tokens=8)
    assert result.stderr.startswith("read plan in ") and "context 128" in result.stderr


def test_a_saved_plan_names_the_model_so_run_needs_no_model_argument(
    llama: Path, tmp_path: Path
) -> None:
    saved = tmp_path / "plan.json"
    assert invoke("plan", llama, *SPLIT, "--context", 128, "--save", saved).exit_code == 0
    with_model = invoke("run", llama, "-p", PROMPT, "-n", 8, "--json", "--plan", saved)
    without = invoke("run", "-p", PROMPT, "-n", 8, "--json", "--plan", saved)
    assert without.exit_code == 0, without.stderr
    assert json.loads(without.stdout)["reply"] == json.loads(with_model.stdout)["reply"]
    assert json.loads(without.stdout)["model"] == str(llama)


@pytest.mark.parametrize(
    "command", [[], ["plan"], ["run"], ["chat"], ["bench"], ["serve"], ["cache"], ["cache", "ls"]]
)
def test_every_command_takes_h_and_version(command: list[str]) -> None:
    from devicemap import __version__

    short, long = invoke(*command, "-h"), invoke(*command, "--help")
    assert short.exit_code == long.exit_code == 0 and short.stdout == long.stdout
    assert "Usage: " in short.stdout and "[OPTIONS]" in short.stdout
    version = invoke(*command, "--version")
    assert version.exit_code == 0 and version.stdout == f"devicemap {__version__}\n"


def test_saved_plan_refuses_planning_options(llama: Path, tmp_path: Path) -> None:
    saved = tmp_path / "plan.json"
    invoke("plan", llama, "--save", saved)
    result = invoke("run", llama, "-p", "hi", "--plan", saved, "--context", 64, *SPLIT)
    assert result.exit_code == 1
    message = result.stderr.strip()
    assert (
        message.startswith("error: --plan reuses a saved plan") and len(message.splitlines()) == 1
    )
    assert "--max-memory" in message and "--context" in message


def test_saved_plan_for_another_model(llama: Path, qwen2: Path, tmp_path: Path) -> None:
    saved = tmp_path / "qwen2.json"
    invoke("plan", qwen2, "--save", saved)
    result = invoke("run", llama, "-p", "hi", "--plan", saved)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert f"this plan was made for {qwen2}" in result.stderr
    assert "make a new plan" in result.stderr


# --- bad input ---------------------------------------------------------------------


def test_model_path_that_does_not_exist(tmp_path: Path) -> None:
    result = invoke("run", tmp_path / "nowhere", "-p", "hi")
    assert result.exit_code == 1
    assert result.stderr == f"error: {tmp_path / 'nowhere'}: no such file or directory." + (
        " Give a model directory, a weights file or a config.json.\n"
    )


def test_hub_id_not_in_the_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    result = invoke("run", "someone/no-such-model", "-p", "hi")
    assert result.exit_code == 1
    assert "not in the Hugging Face cache" in result.stderr
    assert "no network" in result.stderr and "local copy" in result.stderr


def test_prompt_longer_than_the_planned_context(llama: Path) -> None:
    result = invoke("run", llama, "-p", "x" * 100, "--context", 64)
    assert result.exit_code == 1
    tokens = len("<s>user: ") + 100 + len("\n<s>assistant:") - 2 * 2  # <s> is one token
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"error: prompt is {tokens} tokens, the plan holds 64; re-plan with")
    assert "--context" in result.stderr and "loaded in" not in result.stderr  # refused first


def test_prompt_and_new_tokens_past_the_model(llama: Path) -> None:
    # without --context, run plans for prompt + new tokens, capped at the model's 512 positions
    result = invoke("run", llama, "-p", "hi", "--max-new-tokens", 600)
    assert result.exit_code == 1
    assert (
        "21 tokens + 600 new = 621, but the model holds at most 512 tokens;"
        " lower --max-new-tokens to 491" in result.stderr
    )


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (
            ["--temperature", "-1"],
            "temperature must be 0 (greedy) or ≥ 0.0001, got -1.0",
        ),
        (["--top-p", "2", "--top-k", "-3"], "top_p must be in (0, 1]"),
        (["--max-new-tokens", "0"], "max_new_tokens must be an integer ≥ 1, got 0"),
    ],
)
def test_bad_sampling_values(llama: Path, flags: list[str], expected: str) -> None:
    result = invoke("run", llama, "-p", "hi", *flags)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {expected}") or expected in result.stderr
    assert len(result.stderr.splitlines()) == 1 and result.stdout == ""
    if "--top-k" in flags:
        assert "top_k" in result.stderr  # every bad option at once


def test_model_directory_without_a_tokenizer(tiny_models: dict[str, Path]) -> None:
    result = invoke("run", tiny_models["llama"], "-p", "hi")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: no usable tokenizer in {tiny_models['llama']}")
    assert "tokenizer.json" in result.stderr


# --- the demo model ----------------------------------------------------------------


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A devicemap cache holding the converted demo model (~20 s, once per session)."""
    try:
        demo.find_gguf()
    except ModelNotFound as error:  # pragma: no cover - scripts/setup.sh installs it
        pytest.skip(str(error))
    root = tmp_path_factory.mktemp("devicemap-cache")
    demo.demo_model_dir(cache_dir=root)
    return root


@pytest.mark.slow
def test_demo_split_between_cpu_and_disk_answers_like_transformers(
    demo_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEVICEMAP_CACHE", str(demo_cache))
    directory = demo.demo_model_dir()  # the cached conversion: DEVICEMAP_CACHE is read here
    question = "What is the capital of France?"
    budgets = ["--max-memory", "cpu=250MiB", "--max-memory", "disk=2GiB"]
    result = invoke("run", "-p", question, "-n", 12, "--json", *budgets)  # MODEL: the demo
    assert result.exit_code == 0
    out = json.loads(result.stdout)
    assert out["placement"]["cpu"] >= 1 and out["placement"]["disk"] >= 10  # of 34 blocks
    assert out["reply"] == greedy_reply(directory, user(question), max_new_tokens=12)
    assert "Paris" in out["reply"]
    assert out["model"] == str(directory)


@pytest.mark.parametrize("after", [0.3, 1.5])
def test_ctrl_c_during_start_up_is_one_line_and_status_130(after: float) -> None:
    """While Python still imports torch and transformers (seconds), or while planning."""
    import signal
    import subprocess
    import sys
    import time

    process = subprocess.Popen(
        [sys.executable, "-m", "devicemap", "plan", "tests/data/configs/llama-3-70b"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    time.sleep(after)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    if process.returncode == 0 or "blocks per device" in out:
        # done before the signal came (a SIGINT while Python shuts down ends it with -2)
        pytest.skip("the plan was done before the signal came")
    # 130, or killed by the SIGINT itself (how Python ends on an interrupt during its own
    # shutdown): a shell shows both as status 130
    assert process.returncode in (130, -signal.SIGINT), err
    assert "Traceback" not in err and err.strip() in ("[interrupted]", "")
