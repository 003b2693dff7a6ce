"""Streaming generation on a tiny random llama with a byte-level tokenizer."""

from __future__ import annotations

import _thread
import gc
import math
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from devicemap.errors import (
    BadOption,
    ConfigError,
    ContextTooLong,
    DevicemapError,
    GenerationFailed,
)
from devicemap.run.generate import Chat, Sampling, build_prompt, check_context, stream_reply
from tiny import build_tiny

TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def byte_tokenizer(*, template: str | None = TEMPLATE) -> Any:
    """259 tokens: <unk> <s> </s>, then one per byte; ids 1 and 2 match the tiny llama's bos/eos."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def tok() -> Any:
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model(tok: Any) -> Any:
    return build_tiny("llama", vocab_size=len(tok))


class _Slow:
    """Forward pre-hook sleeping `seconds` per step, so a test can act mid-generation."""

    def __init__(self, model: Any, seconds: float):
        self.handle = model.register_forward_pre_hook(lambda *_: time.sleep(seconds))

    def __enter__(self) -> _Slow:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


# --- Sampling ----------------------------------------------------------------


def test_sampling_defaults_are_greedy() -> None:
    s = Sampling()
    assert s.greedy and s.max_new_tokens == 256 and s.seed is None
    assert not Sampling(temperature=0.7).greedy


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("max_new_tokens", 0, "max_new_tokens must be an integer ≥ 1, got 0"),
        ("max_new_tokens", 2.5, "max_new_tokens must be an integer ≥ 1, got 2.5"),
        ("max_new_tokens", True, "max_new_tokens must be an integer ≥ 1, got True"),
        (
            "temperature",
            -1,
            "temperature must be 0 (greedy) or ≥ 0.0001, got -1",
        ),
        (
            "temperature",
            math.nan,
            "temperature must be 0 (greedy) or ≥ 0.0001, got nan",
        ),
        ("top_p", 0.0, "top_p must be in (0, 1] (1 = off), got 0.0"),
        ("top_p", 1.5, "top_p must be in (0, 1] (1 = off), got 1.5"),
        ("top_k", -1, "top_k must be an integer ≥ 0 (0 = off), got -1"),
        ("top_k", 5.0, "top_k must be an integer ≥ 0 (0 = off), got 5.0"),
        ("repetition_penalty", 0, "repetition_penalty must be > 0 (1 = off), got 0"),
        ("repetition_penalty", math.inf, "repetition_penalty must be > 0 (1 = off), got inf"),
        ("seed", -3, "seed must be an integer from 0 to 2^63 - 1, or None, got -3"),
        ("seed", "7", "seed must be an integer from 0 to 2^63 - 1, or None, got '7'"),
        (
            "seed",
            2**64,
            "seed must be an integer from 0 to 2^63 - 1, or None, got 18446744073709551616",
        ),
        (
            "temperature",
            1e-300,
            "temperature must be 0 (greedy) or ≥ 0.0001, got 1e-300",
        ),
    ],
)
def test_sampling_rejects_bad_value(field: str, value: object, expected: str) -> None:
    with pytest.raises(BadOption) as info:
        Sampling(**{field: value})  # type: ignore[arg-type]
    assert str(info.value) == expected
    assert info.value.options == (field,)
    assert isinstance(info.value, ValueError) and isinstance(info.value, DevicemapError)


def test_sampling_lists_every_bad_option_at_once() -> None:
    with pytest.raises(BadOption) as info:
        Sampling(temperature=-1, top_p=2, seed=-1)
    assert info.value.options == ("temperature", "top_p", "seed")
    assert "temperature must be 0 (greedy) or ≥ 0.0001" in str(info.value)
    assert "top_p must be in (0, 1]" in str(info.value)
    assert "seed must be an integer from 0" in str(info.value)


# --- prompts and context -----------------------------------------------------


def test_build_prompt_applies_chat_template(tok: Any) -> None:
    ids = build_prompt(tok, "hi")
    assert ids.shape[0] == 1 and ids.dtype == torch.long
    assert tok.decode(ids[0]) == "<s>user: hi\n<s>assistant:"
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert tok.decode(build_prompt(tok, history)[0]) == "<s>user: a\n<s>assistant: b\n<s>assistant:"


def test_build_prompt_raw_or_without_template(tok: Any) -> None:
    assert tok.decode(build_prompt(tok, "hi", raw=True)[0]) == "hi"
    plain = byte_tokenizer(template=None)
    assert tok.decode(build_prompt(plain, "hi")[0]) == "hi"
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert tok.decode(build_prompt(plain, messages)[0]) == "a\nb"


def test_build_prompt_rejects_empty_prompt(tok: Any) -> None:
    with pytest.raises(BadOption, match="prompt is empty"):
        build_prompt(tok, "", raw=True)


def test_check_context_never_suggests_past_the_model_limit() -> None:
    with pytest.raises(
        ContextTooLong, match=r"holds at most 512 tokens; lower --max-new-tokens to 12"
    ):
        check_context(500, 256, 4096, limit=512)
    with pytest.raises(ContextTooLong, match="at most 512 tokens; shorten the prompt"):
        check_context(600, 10, 4096, limit=512)
    check_context(500, 12, 512, limit=512)  # exactly full: fine


def test_check_context() -> None:
    check_context(100, 156, 256)  # exactly full: fine
    with pytest.raises(ContextTooLong) as info:
        check_context(300, 10, 256)
    assert str(info.value).startswith("prompt is 300 tokens, the plan holds 256; re-plan with")
    assert "--context 512" in str(info.value)
    with pytest.raises(ContextTooLong) as info:
        check_context(200, 100, 256)
    message = str(info.value)
    assert "prompt is 200 tokens + 100 new = 300, the plan holds 256" in message
    assert "--max-new-tokens to 56" in message and "--context 512" in message


# --- streaming ---------------------------------------------------------------


def test_greedy_stream_equals_generate(model: Any, tok: Any) -> None:
    ids = build_prompt(tok, "hello there")
    stream = stream_reply(model, tok, ids, Sampling(max_new_tokens=24))
    pieces = list(stream)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False
    )
    new = out[0, ids.shape[1] :]
    expected = tok.decode(new, skip_special_tokens=True)
    assert "".join(pieces) == expected == stream.reply.text
    assert len(pieces) > 1  # streamed as it went, not at the end
    reply = stream.reply
    assert reply.token_ids == tuple(new.tolist())
    assert reply.prompt_tokens == ids.shape[1] and reply.new_tokens == len(new)
    assert reply.finish_reason == ("stop" if new[-1].item() == 2 else "length")
    assert reply.prefill_s > 0 and reply.decode_s > 0 and reply.tokens_per_s > 0


def test_invalid_bytes_still_stream(model: Any, tok: Any) -> None:
    # a random model stuck on one UTF-8 continuation byte: every prefix of its reply ends in
    # U+FFFD; the text must still come out as it goes, not all at once at the end
    byte = next(i for i in range(3, len(tok)) if tok.decode([i, i, i, i, i]) == "\ufffd" * 5)

    def always(_module: Any, _args: Any, logits: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(logits, -1e4)
        forced[..., byte] = 0
        return forced

    handle = model.lm_head.register_forward_hook(always)
    try:
        stream = stream_reply(model, tok, build_prompt(tok, "x"), Sampling(max_new_tokens=40))
        pieces = list(stream)
    finally:
        handle.remove()
    assert stream.reply.token_ids == (byte,) * 40
    assert len(pieces) >= 5 and "".join(pieces) == stream.reply.text == "\ufffd" * 40


def test_seeded_sampling_is_reproducible(model: Any, tok: Any) -> None:
    ids = build_prompt(tok, "once upon a time")

    def sample(seed: int) -> tuple[int, ...]:
        options = Sampling(max_new_tokens=16, temperature=1.0, top_k=100, top_p=0.95, seed=seed)
        return stream_reply(model, tok, ids, options).reply.token_ids

    first = sample(123)
    assert sample(123) == first
    assert sample(124) != first  # 16 draws from ~100 tokens: a collision is ~impossible
    greedy = stream_reply(model, tok, ids, Sampling(max_new_tokens=16)).reply.token_ids
    assert first != greedy


def test_close_stops_the_worker(model: Any, tok: Any) -> None:
    ids = build_prompt(tok, "x")
    with _Slow(model, 0.01):
        stream = stream_reply(model, tok, ids, Sampling(max_new_tokens=400))
        with stream:
            next(stream)
    assert not stream._worker.is_alive()
    assert stream.reply.finish_reason == "interrupted"
    assert 1 <= stream.reply.new_tokens < 400


@pytest.fixture
def ctrl_c_raises() -> Iterator[None]:
    """SIGINT raising KeyboardInterrupt, as in a foreground process. Started as a shell's
    background job (`pytest &`) the test runner ignores SIGINT, and `interrupt_main` then
    does nothing."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("ctrl_c_raises")
def test_ctrl_c_while_reading_stops_generation(model: Any, tok: Any) -> None:
    ids = build_prompt(tok, "x")
    pieces: list[str] = []
    timer = threading.Timer(0.5, _thread.interrupt_main)  # Ctrl-C, as the terminal sends it
    try:
        with _Slow(model, 0.02), pytest.raises(KeyboardInterrupt):
            stream = stream_reply(model, tok, ids, Sampling(max_new_tokens=400))  # >= 8 s
            timer.start()
            with stream:
                for piece in stream:
                    pieces.append(piece)
    finally:
        timer.cancel()  # never let a late Ctrl-C hit the test runner
    assert not stream._worker.is_alive()
    assert stream.reply.finish_reason == "interrupted"
    assert stream.reply.new_tokens < 100
    assert stream.reply.text.startswith("".join(pieces))


def test_abandoned_stream_stops_its_worker(model: Any, tok: Any) -> None:
    ids = build_prompt(tok, "x")
    with _Slow(model, 0.01):
        stream = stream_reply(model, tok, ids, Sampling(max_new_tokens=400))
        next(stream)
        worker = stream._worker
        del stream
        gc.collect()
        worker.join(timeout=5)
    assert not worker.is_alive()


def test_error_in_generate_reaches_the_reader(model: Any, tok: Any) -> None:
    def fail(*_: Any) -> None:
        raise IndexError("index out of range in self")  # what a bad config value gives

    handle = model.model.layers[0].register_forward_pre_hook(fail)
    try:
        stream = stream_reply(model, tok, torch.tensor([[1, 7]]), Sampling(max_new_tokens=4))
        with pytest.raises(GenerationFailed, match="IndexError: index out of range") as caught:
            list(stream)
    finally:
        handle.remove()
    assert isinstance(caught.value.__cause__, IndexError)
    assert not stream._worker.is_alive()


def test_a_token_id_past_the_vocabulary_is_refused_before_generating(model: Any, tok: Any) -> None:
    ids = torch.tensor([[1, 10_000]])  # a tokenizer that is not this model's
    with pytest.raises(ConfigError, match="token id 10000, but the model's vocabulary has"):
        stream_reply(model, tok, ids, Sampling(max_new_tokens=4))


# --- chat --------------------------------------------------------------------


def test_chat_keeps_history_and_reset_clears_it(model: Any, tok: Any) -> None:
    chat = Chat(model, tok, sampling=Sampling(max_new_tokens=6), system="be brief")
    first = "".join(chat.send("hi"))
    assert chat.last_reply is not None and chat.last_reply.text == first
    assert chat.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": first},
    ]
    first_prompt = chat.last_reply.prompt_tokens
    second = "".join(chat.send("and?"))
    roles = [m["role"] for m in chat.messages]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert chat.messages[-1]["content"] == second
    assert chat.last_reply.prompt_tokens > first_prompt + 6  # the first turn is in the prompt
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "be brief"}]
    assert chat.last_reply is None


def test_chat_keeps_an_interrupted_reply(model: Any, tok: Any) -> None:
    chat = Chat(model, tok, sampling=Sampling(max_new_tokens=400))
    with _Slow(model, 0.01):
        stream = chat.send("hi")
        next(stream)
        stream.close()
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]
    assert chat.messages[1]["content"] == stream.reply.text
    assert stream.reply.finish_reason == "interrupted"


def test_chat_refuses_a_prompt_past_the_context(model: Any, tok: Any) -> None:
    chat = Chat(model, tok, sampling=Sampling(max_new_tokens=8), context=32)
    with pytest.raises(ContextTooLong, match="the plan holds 32"):
        chat.send("a" * 40)
    assert chat.messages == []


def test_chat_never_suggests_a_context_past_the_models_own(model: Any, tok: Any) -> None:
    chat = Chat(model, tok, sampling=Sampling(max_new_tokens=8), context=32, limit=64)
    with pytest.raises(ContextTooLong, match="the model holds at most 64 tokens"):
        chat.send("a" * 100)


def test_text_decoder_streams_in_constant_work_per_token(tok: Any) -> None:
    """Each step decodes a few tokens, never the reply so far; the pieces add up to the
    whole text, characters split over several byte tokens included."""
    from devicemap.run.generate import TextDecoder

    text = "Paris, café, 東京 and ünïcödé — " * 20
    ids = tok(text, add_special_tokens=False).input_ids
    lengths: list[int] = []

    class Counting:
        def decode(self, part: list[int], **kw: Any) -> str:
            lengths.append(len(part))
            return str(tok.decode(part, **kw))

    decoder = TextDecoder(Counting())
    pieces = [decoder.add([i]) for i in ids]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    assert len(ids) > 500 and max(lengths) <= 8
    assert sum(1 for p in pieces if p) > len(text) / 2  # it streamed, character by character
