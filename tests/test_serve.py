"""`devicemap serve` live on 127.0.0.1: a tiny llama (byte tokenizer, chat template) split
between RAM and disk, reached with the official `openai` client and with raw HTTP; batching
of concurrent clients, disconnects, every bad request's status and error shape, a bounded
load test, a taken port, SIGTERM mid-stream, images for a vision-language model."""

from __future__ import annotations

import base64
import concurrent.futures as futures
import http.client
import io
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from live_server import KEY, Server
from test_custom_code import llava, picture  # noqa: F401 - the llava fixture
from test_generate import byte_tokenizer
from tiny import make_tiny_chat

openai = pytest.importorskip("openai")

CONTEXT = 512


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_chat(
        tmp_path_factory.mktemp("serve") / "tiny-chat", byte_tokenizer(),
        hidden_size=128, intermediate_size=256,
    )  # fmt: skip


SPLIT = ("--pin", "model.layers.2=disk", "--pin", "model.layers.3=disk", "--offload-exec", "cpu")


@pytest.fixture(scope="module")
def server(model: Path) -> Iterator[Server]:
    """Eight rows, RAM + disk, an API key."""
    live = Server(model, "--max-batch", "8", "--context", str(CONTEXT), "--api-key", KEY, *SPLIT)
    yield live
    assert live.stop() == 0, live.stderr


@pytest.fixture(scope="module")
def one_row(model: Path) -> Iterator[Server]:
    """One row, no queue, no key: the second request is turned away while the first runs."""
    live = Server(model, "--max-batch", "1", "--queue", "0", "--context", str(CONTEXT))
    yield live
    assert live.stop() == 0, live.stderr


NAME_OF = "tiny-chat"  # the directory's name, accepted as the model id


def ask(server: Server, text: str, **kw: Any) -> Any:
    client = server.client()
    return client.chat.completions.create(
        model=served(server), messages=[{"role": "user", "content": text}],
        **{"max_tokens": 12, "temperature": 0, **kw},
    )  # fmt: skip


def served(server: Server) -> str:
    return server.model_id


# --- the openai client -----------------------------------------------------------------


def test_models_lists_the_served_model_and_accepts_its_directory_name(server: Server) -> None:
    models = server.client().models.list().data
    assert len(models) == 1 and models[0].id.endswith("tiny-chat")
    reply = server.client().chat.completions.create(
        model=NAME_OF, messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0
    )
    assert reply.choices[0].message.role == "assistant"


def test_chat_streamed_and_not_give_the_same_reply_and_usage(server: Server) -> None:
    whole = ask(server, "What is the capital of France?")
    choice = whole.choices[0]
    assert choice.finish_reason in ("stop", "length") and whole.object == "chat.completion"
    assert whole.usage.completion_tokens <= 12 and whole.usage.prompt_tokens > 5
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    question = [{"role": "user", "content": "What is the capital of France?"}]
    stream = server.client().chat.completions.create(
        model=served(server), messages=question,
        max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == choice.finish_reason and not any(finishes[:-1])
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_raw_prompt_streamed_and_not(server: Server) -> None:
    client = server.client()
    whole = client.completions.create(
        model=served(server), prompt="Once upon a time", max_tokens=10, temperature=0
    )
    assert whole.object == "text_completion" and whole.usage.completion_tokens <= 10
    parts = client.completions.create(
        model=served(server), prompt="Once upon a time", max_tokens=10, temperature=0, stream=True
    )
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text


def test_max_tokens_gives_finish_reason_length(server: Server) -> None:
    reply = ask(server, "Tell me everything.", max_tokens=3, stop=None)
    if reply.choices[0].finish_reason == "length":
        assert reply.usage.completion_tokens == 3
    else:  # the random model said end-of-sequence first
        assert reply.usage.completion_tokens <= 3


def test_a_stop_string_cuts_the_reply(server: Server) -> None:
    full = ask(server, "Count with me.", max_tokens=24).choices[0].message.content
    if len(full) < 6:
        pytest.skip("the random model's reply is too short to cut")
    stop = full[2:5]
    cut = ask(server, "Count with me.", max_tokens=24, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats(server: Server) -> None:
    a = ask(server, "Pick a word.", temperature=0.8, top_p=0.9, seed=11)
    b = ask(server, "Pick a word.", temperature=0.8, top_p=0.9, seed=11)
    assert a.choices[0].message.content == b.choices[0].message.content


# --- raw HTTP: the SSE framing ------------------------------------------------------------


def test_sse_framing_is_what_openai_clients_parse(server: Server) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = {
        "model": served(server), "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 8, "temperature": 0, "stream": True,
    }  # fmt: skip
    conn.request(
        "POST", "/v1/chat/completions", body=json.dumps(body),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )  # fmt: skip
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("content-type", "").startswith("text/event-stream")
    raw = response.read().decode()
    conn.close()
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == ask(server, "Hello", max_tokens=8).choices[0].message.content


# --- batching -------------------------------------------------------------------------------

QUESTIONS = [
    "What is the capital of France?", "Name a colour.", "Count to five.", "What is 2+2?",
    "Say hello.", "Who wrote Hamlet? Answer in one line, please.", "Water?", "A fruit.",
]  # fmt: skip


def test_eight_concurrent_clients_get_the_answers_they_get_alone_in_shared_steps(
    server: Server,
) -> None:
    alone = [ask(server, q, max_tokens=16).choices[0].message.content for q in QUESTIONS]
    before = server.health()
    with futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda q: ask(server, q, max_tokens=16), QUESTIONS))
    after = server.health()
    assert [r.choices[0].message.content for r in replies] == alone
    tokens = after["generated_tokens"] - before["generated_tokens"]
    steps = after["decode_steps"] - before["decode_steps"]
    assert tokens == sum(r.usage.completion_tokens for r in replies)
    assert tokens / steps > 2, "concurrent requests did not share decode steps"


def test_a_bounded_load_of_200_requests_from_16_clients_is_answered_whole(
    server: Server,
) -> None:
    prompts = QUESTIONS[:4]
    expected = {q: ask(server, q, max_tokens=6).choices[0].message.content for q in prompts}

    def one(i: int) -> str:
        q = prompts[i % 4]
        if i % 2:  # streamed
            stream = server.client().chat.completions.create(
                model=served_id, messages=[{"role": "user", "content": q}], max_tokens=6,
                temperature=0, stream=True,
            )  # fmt: skip
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        else:
            text = ask(server, q, max_tokens=6).choices[0].message.content
        assert text == expected[q], (i, text, expected[q])
        return text

    served_id = served(server)
    start = time.monotonic()
    with futures.ThreadPoolExecutor(16) as pool:
        done = list(pool.map(one, range(200)))
    assert len(done) == 200
    assert time.monotonic() - start < 240
    health = server.health()
    assert health["active"] == 0 and health["waiting"] == 0


# --- disconnects and a full queue -------------------------------------------------------------


def endless(server: Server) -> str:
    """A prompt the random model answers at length (no end-of-sequence in 48 tokens)."""
    for text in ("Go on forever.", "Go on.", "Tell me a story.", "More.", "a", "b", "c", "d"):
        if ask(server, text, max_tokens=48).choices[0].finish_reason == "length":
            return text
    pytest.skip("every candidate prompt ends early on this random model")


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_a_client_that_disconnects_mid_reply_frees_its_row(one_row: Server, stream: bool) -> None:
    before = one_row.health()["generated_tokens"]
    sock = socket.create_connection(("127.0.0.1", one_row.port))
    body = json.dumps({
        "model": served(one_row), "messages": [{"role": "user", "content": endless(one_row)}],
        "max_tokens": CONTEXT - 40, "temperature": 0, "stream": stream,
    }).encode()  # fmt: skip
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    if stream:
        sock.settimeout(30)
        received = b""
        while b"data: " not in received:  # the stream has started
            received += sock.recv(4096)
    deadline = time.monotonic() + 30
    while not one_row.health()["active"] and time.monotonic() < deadline:
        time.sleep(0.01)  # the model is on it
    sock.close()
    while one_row.health()["active"] and time.monotonic() < deadline:
        time.sleep(0.02)
    health = one_row.health()
    assert health["active"] == 0
    assert health["generated_tokens"] - before < CONTEXT - 40  # it stopped early
    reply = one_row.client().chat.completions.create(
        model=served(one_row), messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert reply.choices  # the row is free again


def test_a_full_queue_is_503_and_health_answers_during_a_long_generation(one_row: Server) -> None:
    client = one_row.client()
    name = served(one_row)
    stream = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": endless(one_row)}],
        max_tokens=CONTEXT - 40, temperature=0, stream=True,
    )  # fmt: skip
    chunks = iter(stream)
    while not next(chunks).choices[0].delta.content:  # the role chunk comes before the model
        pass  # has started on the request
    try:
        t0 = time.monotonic()
        assert one_row.health()["active"] == 1
        assert time.monotonic() - t0 < 2
        status, body = one_row.http(
            "POST", "/v1/chat/completions",
            {"model": name, "messages": [{"role": "user", "content": "me too"}]},
        )  # fmt: skip
        assert status == 503
        assert body["error"]["code"] == "queue_full" and body["error"]["type"] == "server_error"
    finally:
        stream.close()


# --- bad requests ---------------------------------------------------------------------------------


def shape(body: Any) -> dict[str, Any]:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return dict(error)


AUTH = {"Authorization": f"Bearer {KEY}"}


def chat_body(server: Server, **fields: Any) -> dict[str, Any]:
    body = {"model": served(server), "messages": [{"role": "user", "content": "hi"}]}
    body.update(fields)
    return {k: v for k, v in body.items() if v is not ...}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": ...}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"seed": -3}, "seed"),
        ({"stop": [1, 2]}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"n": 2}, "n"),
        ({"model": ...}, "model"),
        ({"model": 7}, "model"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
                "url": "https://example.com/cat.png"}}]}]},
            "messages[0].content[0].image_url",
        ),
    ],
)  # fmt: skip
def test_a_bad_parameter_is_400_naming_it(
    server: Server, fields: dict[str, Any], param: str
) -> None:
    status, body = server.http("POST", "/v1/chat/completions", chat_body(server, **fields), **AUTH)
    assert status == 400, body
    error = shape(body)
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_a_prompt_past_the_context_is_400_context_length_exceeded(server: Server) -> None:
    long = chat_body(server, messages=[{"role": "user", "content": "x" * (CONTEXT + 10)}])
    status, body = server.http("POST", "/v1/chat/completions", long, **AUTH)
    assert status == 400 and shape(body)["code"] == "context_length_exceeded"
    assert str(CONTEXT) in body["error"]["message"]
    too_many = chat_body(server, max_tokens=CONTEXT)
    status, body = server.http("POST", "/v1/chat/completions", too_many, **AUTH)
    assert status == 400 and shape(body)["code"] == "context_length_exceeded"


def test_malformed_json_an_unknown_model_a_huge_body_and_a_wrong_route(server: Server) -> None:
    status, body = server.http("POST", "/v1/chat/completions", b"{not json", **AUTH)
    assert status == 400 and "JSON" in shape(body)["message"]
    status, body = server.http("POST", "/v1/chat/completions", b"[1, 2]", **AUTH)
    assert status == 400 and shape(body)
    status, body = server.http(
        "POST", "/v1/chat/completions", chat_body(server, model="gpt-4o"), **AUTH
    )
    assert status == 404 and shape(body)["code"] == "model_not_found"
    huge = b'{"model": "x", "messages": [], "pad": "' + b"x" * (10 << 20) + b'"}'
    status, body = server.http("POST", "/v1/chat/completions", huge, **AUTH)
    assert status == 413 and shape(body)
    status, body = server.http("GET", "/v1/nothing-here", **AUTH)
    assert status == 404 and shape(body)
    assert ask(server, "still there?", max_tokens=2).choices  # the server goes on


def test_a_wrong_or_missing_api_key_is_401_and_health_needs_none(server: Server) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}):
        status, body = server.http("POST", "/v1/chat/completions", chat_body(server), **headers)
        assert status == 401 and shape(body)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    assert server.health()["status"] == "ok"


def test_images_on_a_text_model_are_400(server: Server) -> None:
    url = "data:image/png;base64," + png_base64()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]
    body = chat_body(server, messages=[{"role": "user", "content": content}])
    status, answer = server.http("POST", "/v1/chat/completions", body, **AUTH)
    assert status == 400 and "does not take images" in shape(answer)["message"]


def png_base64() -> str:
    buffer = io.BytesIO()
    picture().save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# --- the process ---------------------------------------------------------------------------------


def test_a_port_in_use_is_one_error_line_naming_it(model: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        result = subprocess.run(
            [sys.executable, "-m", "devicemap", "serve", str(model), "--port", str(port)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    finally:
        taken.close()
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: port {port} on 127.0.0.1 is in use: stop what listens there, or pick another"
        " with --port"
    ]


@pytest.mark.parametrize(
    ("sig", "status"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)], ids=["SIGTERM", "Ctrl-C"]
)
def test_a_signal_ends_the_streams_in_flight_cleanly_and_exits(
    model: Path, sig: int, status: int
) -> None:
    live = Server(model, "--max-batch", "2", "--context", str(CONTEXT))
    try:
        stream = live.client().chat.completions.create(
            model=served(live), messages=[{"role": "user", "content": endless(live)}],
            max_tokens=CONTEXT - 40, temperature=0, stream=True,
        )  # fmt: skip
        chunks = iter(stream)
        next(chunks)
        live.process.send_signal(sig)
        rest = list(chunks)  # the openai client stops at [DONE]; an unclean end raises
        assert rest and rest[-1].choices[0].finish_reason in ("abort", "stop", "length")
        assert live.process.wait(60) == status
        assert "server stopped" in live.stderr
    finally:
        live.stop(signal.SIGKILL)


def test_a_vision_language_model_answers_an_image_in_a_data_url(llava: Path) -> None:  # noqa: F811
    import torch
    import transformers as tf

    processor = tf.AutoProcessor.from_pretrained(llava)
    reference = tf.LlavaForConditionalGeneration.from_pretrained(llava).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=text, images=[picture()], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = reference.generate(**inputs, max_new_tokens=5, do_sample=False)
    expected = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    live = Server(llava, "--max-batch", "2", "--context", "128", "--pin", "model.vision_tower=disk")
    try:
        url = "data:image/png;base64," + png_base64()
        reply = live.client().chat.completions.create(
            model=served(live), max_tokens=5, temperature=0,
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"},
            ]}],
        )  # fmt: skip
        assert reply.choices[0].message.content == expected
        status, body = live.http(
            "POST", "/v1/chat/completions",
            {"model": served(live), "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
        )  # fmt: skip
        assert status == 400 and "not an image" in shape(body)["message"]
    finally:
        assert live.stop() == 0, live.stderr
