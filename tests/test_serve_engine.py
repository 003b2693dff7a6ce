"""The serving engine (serve/engine.py) in process: requests that join a running batch at
different steps, with prompts of different lengths, get exactly the tokens `generate` gives
each alone; seeded sampling does not depend on the batch; stop strings, cancellation, a
full queue and shutdown."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch

from devicemap.errors import ConfigError
from devicemap.run.generate import Sampling
from devicemap.serve.engine import Engine, EngineClosed, Event, Job, QueueFull
from test_generate import byte_tokenizer
from tiny import build_tiny


class Collect:
    """A Job's events, and a wait for its end."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.done = threading.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if event.kind != "text":
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if e.kind == "text")

    def wait(self) -> Event:
        assert self.done.wait(60), "the request never ended"
        return self.events[-1]


@pytest.fixture(scope="module")
def tok() -> Any:
    return byte_tokenizer()


def model_of(arch: str, tok: Any, **overrides: Any) -> Any:
    model = build_tiny(arch, vocab_size=len(tok), **overrides)
    with torch.no_grad():  # spread logits: fewer near-ties between the argmax and the rest
        model.get_input_embeddings().weight.normal_(0, 1)
    return model


def prompt(tok: Any, text: str) -> list[int]:
    return list(tok(text).input_ids)


def generated(model: Any, ids: list[int], n: int) -> list[int]:
    """Plain transformers: greedy generate alone, the new tokens (eos included)."""
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
            pad_token_id=model.generation_config.eos_token_id,
        )  # fmt: skip
    return list(out[0, len(ids) :].tolist())


def submit(engine: Engine, ids: list[int], sampling: Sampling, **kw: Any) -> tuple[Job, Collect]:
    collect = Collect()
    job = Job(ids, sampling, collect, **kw)
    engine.submit(job)
    return job, collect


TEXTS = ["a", "hello there", "the quick brown fox jumps", "0123456789" * 3, "xy", "zzz top"]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "mistral"])
def test_requests_joining_at_different_steps_get_the_tokens_generate_gives_alone(
    arch: str, tok: Any
) -> None:
    """mistral's sliding-window cache cannot take padded rows: it goes one forward per
    request, with the same result."""
    model = model_of(arch, tok)
    n = 12
    prompts = [prompt(tok, t) for t in TEXTS]
    expected = [generated(model, p, n) for p in prompts]
    engine = Engine(model, tok, max_batch=4, queue_size=16)
    try:
        jobs = []
        for i, ids in enumerate(prompts):  # some arrive while others decode
            jobs.append(submit(engine, ids, Sampling(max_new_tokens=n)))
            if i % 2:
                time.sleep(0.02)
        for (job, collect), want in zip(jobs, expected, strict=True):
            end = collect.wait()
            assert end.kind == "end" and job.ids == want, TEXTS[jobs.index((job, collect))]
            assert end.completion_tokens == len(want) and end.prompt_tokens == len(job.prompt_ids)
            assert end.finish_reason == ("stop" if want[-1] == 2 else "length")
        if arch != "mistral":
            assert engine.tokens / engine.decode_steps > 1.5  # rows shared forwards
    finally:
        engine.close()


def test_one_forward_per_step_serves_every_active_row(tok: Any) -> None:
    model = model_of("llama", tok)
    engine = Engine(model, tok, max_batch=8)
    try:
        with engine._wake:  # hold the worker: all eight are admitted together
            pending = [submit(engine, prompt(tok, t), Sampling(max_new_tokens=10)) for t in TEXTS]
        for _, collect in pending:
            collect.wait()
        longest = max(len(job.ids) for job, _ in pending)
        # the first request's prefill alone (it tells whether the cache takes padded rows),
        # one for the other five together, then one forward per step for all of them
        assert engine.forwards == 2 + longest - 1
        assert engine.decode_steps == longest - 1
    finally:
        engine.close()


def test_seeded_sampling_does_not_depend_on_the_rest_of_the_batch(tok: Any) -> None:
    model = model_of("llama", tok)
    sampling = Sampling(max_new_tokens=10, temperature=0.9, top_p=0.9, top_k=50, seed=7)
    ids = prompt(tok, "sample me")
    engine = Engine(model, tok, max_batch=4)
    try:
        alone, alone_done = submit(engine, ids, sampling)
        alone_done.wait()
        others = [submit(engine, prompt(tok, t), Sampling(max_new_tokens=10)) for t in TEXTS[:3]]
        together, collect = submit(engine, ids, sampling)
        collect.wait()
        for _, c in others:
            c.wait()
        assert together.ids == alone.ids
        different, collect = submit(engine, ids, Sampling(**{**sampling.__dict__, "seed": 8}))
        collect.wait()
        assert different.ids != alone.ids
    finally:
        engine.close()


def test_a_stop_string_ends_the_reply_before_it_and_is_never_streamed(tok: Any) -> None:
    model = model_of("llama", tok)
    engine = Engine(model, tok, max_batch=2)
    try:
        ids = prompt(tok, "hello there")
        _, collect = submit(engine, ids, Sampling(max_new_tokens=16))
        assert collect.wait().finish_reason in ("length", "stop")
        full = collect.text
        assert len(full) >= 6
        stop = full[3:6]  # three characters from inside the reply
        _, collect = submit(engine, ids, Sampling(max_new_tokens=16), stop=("never", stop))
        end = collect.wait()
        assert end.finish_reason == "stop"
        assert collect.text == full[: full.index(stop)]
        assert all(stop not in e.text for e in collect.events)
    finally:
        engine.close()


def test_a_cancelled_request_leaves_the_batch_and_frees_its_row(tok: Any) -> None:
    model = model_of("llama", tok, max_position_embeddings=4096)
    engine = Engine(model, tok, max_batch=1, queue_size=0)
    try:
        job, collect = submit(engine, prompt(tok, "go on"), Sampling(max_new_tokens=3000))
        while not collect.events:
            time.sleep(0.01)
        with pytest.raises(QueueFull, match="retry later"):
            submit(engine, prompt(tok, "me too"), Sampling(max_new_tokens=2))
        job.cancel()
        end = collect.wait()
        assert end.finish_reason == "abort" and end.completion_tokens < 3000
        deadline = time.monotonic() + 10
        while engine.active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.active == 0
        _, again = submit(engine, prompt(tok, "me too"), Sampling(max_new_tokens=2))
        assert again.wait().kind == "end"
    finally:
        engine.close()


def test_close_ends_every_request_and_refuses_new_ones(tok: Any) -> None:
    model = model_of("llama", tok, max_position_embeddings=4096)
    engine = Engine(model, tok, max_batch=1, queue_size=4)
    running = submit(engine, prompt(tok, "long"), Sampling(max_new_tokens=3000))[1]
    waiting = submit(engine, prompt(tok, "later"), Sampling(max_new_tokens=3000))[1]
    engine.close()
    assert running.wait().finish_reason == "abort" and waiting.wait().finish_reason == "abort"
    with pytest.raises(EngineClosed):
        submit(engine, prompt(tok, "after"), Sampling(max_new_tokens=2))


def test_a_model_failure_fails_its_requests_and_the_engine_goes_on(tok: Any) -> None:
    model = model_of("llama", tok)
    engine = Engine(model, tok, max_batch=2)
    calls = {"n": 0}

    def fail_once(*_: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")

    handle = model.model.layers[1].register_forward_pre_hook(fail_once)
    try:
        _, broken = submit(engine, prompt(tok, "x"), Sampling(max_new_tokens=4))
        assert broken.wait().kind == "error" and "boom" in str(broken.wait().error)
        _, fine = submit(engine, prompt(tok, "x"), Sampling(max_new_tokens=4))
        assert fine.wait().kind == "end"
    finally:
        handle.remove()
        engine.close()


def test_a_failure_between_forwards_fails_the_rows_and_the_engine_goes_on(
    tok: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = model_of("llama", tok)
    engine = Engine(model, tok, max_batch=2)
    real, calls = engine._pick, {"n": 0}

    def pick_badly(job: Job, logits: torch.Tensor) -> int:
        calls["n"] += 1
        if calls["n"] == 3:  # in a decode step, after the prefill
            raise IndexError("a bug")
        return real(job, logits)

    monkeypatch.setattr(engine, "_pick", pick_badly)
    try:
        _, broken = submit(engine, prompt(tok, "x"), Sampling(max_new_tokens=6))
        end = broken.wait()
        assert end.kind == "error" and "IndexError: a bug" in str(end.error)
        _, fine = submit(engine, prompt(tok, "x"), Sampling(max_new_tokens=4))
        assert fine.wait().kind == "end" and engine.active == 0
    finally:
        engine.close()


def test_a_token_id_past_the_vocabulary_is_refused_at_submit(tok: Any) -> None:
    model = model_of("llama", tok)
    engine = Engine(model, tok, max_batch=1)
    try:
        with pytest.raises(ConfigError, match="vocabulary"):
            submit(engine, [1, len(tok) + 5], Sampling(max_new_tokens=2))
    finally:
        engine.close()


def test_an_unexpected_failure_in_the_app_is_500_in_openai_shape() -> None:
    from fastapi.testclient import TestClient

    from devicemap.serve.app import Settings, create_app

    class Broken:
        chat_template = None

        def __call__(self, *_: Any, **__: Any) -> Any:
            raise KeyError("no such piece")

    engine = type("Idle", (), {"active": 0, "waiting": 0, "max_batch": 1})()
    app = create_app(engine, Settings(model_id="m", tokenizer=Broken(), context=64))
    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.post("/v1/completions", json={"model": "m", "prompt": "hi"})
    assert answer.status_code == 500
    error = answer.json()["error"]
    assert error["type"] == "server_error" and "KeyError" in error["message"]
