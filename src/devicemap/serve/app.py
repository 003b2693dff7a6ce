"""The OpenAI-compatible HTTP API over an Engine (FastAPI; uvicorn serves it, cli/serve.py).

POST /v1/chat/completions and /v1/completions (streamed as server-sent events with
`stream: true`, ending with `data: [DONE]`), GET /v1/models, GET /health. Every error is
OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with its HTTP status:
400 bad parameters or a prompt past the planned context, 401 a wrong API key, 404 an
unknown model or route, 413 a body over the size limit, 503 a full queue.

Requests are checked and tokenized here (in a worker thread: a chat template may take a
while); the Engine's thread runs the model, so the server answers /health while it decodes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ContextTooLong, DevicemapError, TemplateError
from ..run.generate import (
    Sampling,
    build_image_prompt,
    build_prompt,
    check_context,
    replace_undecodable,
)
from .engine import EngineClosed, Event, Job, QueueFull

MAX_BODY = 10 << 20  # bytes of a request body
MAX_STOPS = 4  # stop strings per request, as OpenAI
_POLL_S = 0.25  # seconds between checks that a waiting (non-streamed) client is still there


@dataclass(frozen=True)
class Settings:
    """What the app serves and how."""

    model_id: str  # the name clients give as "model" (and /v1/models lists)
    tokenizer: Any
    context: int  # tokens per sequence the plan holds
    limit: int | None = None  # the model's own longest context
    processor: Any = None  # for image content parts (a vision-language model)
    no_images: str = "this model does not take images"  # why, when processor is None
    api_key: str | None = None
    max_body: int = MAX_BODY
    aliases: tuple[str, ...] = ()  # other names accepted as "model"


class ApiError(Exception):
    """A request the server refuses, in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = (
            status,
            message,
            kind,
            param,
            code,
        )

    def body(self) -> dict[str, Any]:
        return error_body(self.message, kind=self.kind, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def error_body(
    message: str, *, kind: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def create_app(engine: Any, settings: Settings) -> FastAPI:
    """The FastAPI app serving `engine` (an Engine: submit(Job), active, waiting)."""
    app = FastAPI(title="devicemap", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if error.status_code == 404 else None
        return ApiError(error.status_code, str(error.detail), code=code).response()

    @app.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception) -> JSONResponse:
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        message = f"the server failed on this request ({type(error).__name__}: {reason})"
        return ApiError(500, message, kind="server_error").response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": settings.model_id,
            "active": engine.active,
            "waiting": engine.waiting,
            "max_batch": engine.max_batch,
            "decode_steps": engine.decode_steps,  # one forward each, for every active request
            "generated_tokens": engine.tokens,
        }

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _authorize(request, settings)
        return {"object": "list", "data": [_model_card(settings.model_id, created)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> dict[str, Any]:
        _authorize(request, settings)
        _check_model(name, settings)
        return _model_card(settings.model_id, created)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        _authorize(request, settings)
        body = await _json_body(request, settings.max_body)
        _check_model(body.get("model"), settings)
        messages, images = _messages(body.get("messages"))
        prompt = await asyncio.to_thread(_chat_prompt, messages, images, settings)
        return await _complete(request, engine, settings, body, prompt, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        _authorize(request, settings)
        body = await _json_body(request, settings.max_body)
        _check_model(body.get("model"), settings)
        text = _prompt_text(body.get("prompt"))
        prompt = await asyncio.to_thread(_raw_prompt, text, settings)
        return await _complete(request, engine, settings, body, prompt, chat=False)

    return app


# --- checking requests ------------------------------------------------------------------


def _authorize(request: Request, settings: Settings) -> None:
    if settings.api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, key = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        key.strip().encode(), settings.api_key.encode()
    ):
        raise ApiError(
            401,
            "Incorrect API key provided: give the server's --api-key as"
            " 'Authorization: Bearer KEY'",
            code="invalid_api_key",
        )


async def _json_body(request: Request, limit: int) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as error:
        raise ApiError(400, f"the request body is not valid JSON ({error})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit} bytes", code="body_too_large")


def _check_model(name: Any, settings: Settings) -> None:
    if name is None:
        raise ApiError(400, "missing 'model': give the served model's id", param="model")
    if not isinstance(name, str):
        raise _wrong_type("model", "a string", name)
    if name not in (settings.model_id, *settings.aliases):
        raise ApiError(
            404,
            f"The model '{name}' does not exist: this server serves '{settings.model_id}'"
            " (GET /v1/models)",
            param="model",
            code="model_not_found",
        )


def _wrong_type(param: str, wanted: str, value: Any) -> ApiError:
    got = "null" if value is None else type(value).__name__
    return ApiError(400, f"'{param}' must be {wanted}, got {got}", param=param)


def _messages(value: Any) -> tuple[list[dict[str, str]], list[Any]]:
    """The chat messages as text turns, and the images of the last user turn."""
    if value is None:
        raise ApiError(400, "missing 'messages': a list of {role, content}", param="messages")
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    turns, images, image_turn = [], [], None
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _wrong_type(where, "an object", message)
        role = message.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise ApiError(
                400,
                f"{where}.role must be 'system', 'developer', 'user' or 'assistant', got {role!r}",
                param=f"{where}.role",
            )
        text, found = _content(message.get("content"), f"{where}.content")
        if found:
            if role != "user":
                raise ApiError(400, f"{where}: only user messages may hold images", param=where)
            images, image_turn = found, i
        turns.append({"role": role, "content": text})
    if images and image_turn != len(value) - 1:
        raise ApiError(
            400, "images are taken in the last message only (a user turn)", param="messages"
        )
    return turns, images


def _content(value: Any, where: str) -> tuple[str, list[Any]]:
    if isinstance(value, str):
        return value, []
    if not isinstance(value, list):
        raise _wrong_type(where, "a string or a list of content parts", value)
    texts, images = [], []
    for j, part in enumerate(value):
        at = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise _wrong_type(at, "an object", part)
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise _wrong_type(f"{at}.text", "a string", part.get("text"))
            texts.append(part["text"])
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise _wrong_type(f"{at}.image_url.url", "a string", url)
            images.append(_image(url, f"{at}.image_url"))
        else:
            raise ApiError(
                400, f"{at}.type must be 'text' or 'image_url', got {kind!r}", param=f"{at}.type"
            )
    return "\n".join(texts), images


def _image(url: str, where: str) -> Any:
    """A data: URL decoded to an RGB image."""
    header, comma, data = url.partition(",")
    if not url.startswith("data:") or not comma or ";base64" not in header:
        raise ApiError(
            400,
            f"{where}: give the image inline as a data URL (data:image/png;base64,...); this"
            " server fetches nothing from the network",
            param=where,
        )
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where}: the data URL is not valid base64", param=where) from None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as picture:
            return picture.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise ApiError(
            400, f"{where}: not an image this server can decode ({error})", param=where
        ) from None


def _prompt_text(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if value is None:
        raise ApiError(400, "missing 'prompt'", param="prompt")
    if not isinstance(value, str):
        raise _wrong_type("prompt", "a string (or a list of one string)", value)
    return value


@dataclass(frozen=True)
class _Prompt:
    ids: list[int]
    inputs: Mapping[str, Any] | None = None


def _chat_prompt(messages: list[dict[str, str]], images: list[Any], s: Settings) -> _Prompt:
    try:
        if images:
            if s.processor is None:
                raise ApiError(400, f"{s.no_images}: send text only", param="messages")
            ids, inputs = build_image_prompt(s.processor, messages, images)
            return _Prompt(ids[0].tolist(), inputs)
        return _Prompt(build_prompt(s.tokenizer, messages)[0].tolist())
    except TemplateError as error:
        raise ApiError(400, str(error), param="messages", code="template_error") from None
    except DevicemapError as error:  # an empty prompt, an image the processor refuses
        raise ApiError(400, str(error), param="messages") from None


def _raw_prompt(text: str, s: Settings) -> _Prompt:
    text, _ = replace_undecodable(text)
    ids = s.tokenizer(text).input_ids
    if not ids:
        raise ApiError(400, "the prompt is empty: give at least one token of text", param="prompt")
    return _Prompt(list(ids))


def _sampling(body: Mapping[str, Any], prompt_tokens: int, s: Settings) -> Sampling:
    """The request's sampling options, checked against OpenAI's ranges and the context."""
    n = body.get("n", 1)
    if n not in (1, None):
        raise ApiError(400, "'n' must be 1: this server generates one choice", param="n")
    for flag in ("logprobs", "echo"):
        if body.get(flag):
            raise ApiError(400, f"'{flag}' is not supported by this server", param=flag)
    if body.get("tools"):
        raise ApiError(400, "'tools' is not supported by this server", param="tools")
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    limit = min(s.context, s.limit) if s.limit else s.context
    max_tokens = body.get(name)
    if max_tokens is None:
        max_tokens = limit - prompt_tokens  # as long as the context allows
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise ApiError(400, f"'{name}' must be an integer ≥ 1, got {max_tokens!r}", param=name)
    try:
        check_context(prompt_tokens, max(int(max_tokens), 1), s.context, limit=s.limit)
    except ContextTooLong as error:
        message = (
            f"This model's planned context is {s.context} tokens; the prompt is {prompt_tokens}"
            f" tokens and '{name}' asks for {max_tokens} more ({error}). Shorten the prompt or"
            f" lower '{name}'"
        )
        raise ApiError(400, message, param=name, code="context_length_exceeded") from None
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise ApiError(400, "'top_p' must be in (0, 1]", param="top_p")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):
        raise ApiError(
            400, f"'seed' must be an integer from 0 to 2^63 - 1, got {seed!r}", param="seed"
        )
    top_k = body.get("top_k", 0)  # not OpenAI's, but vLLM's and llama.cpp's
    if not _is_int(top_k) or top_k < 0:
        raise ApiError(400, f"'top_k' must be an integer ≥ 0, got {top_k!r}", param="top_k")
    return Sampling(
        max_new_tokens=int(max_tokens),
        temperature=0.0 if temperature < 1e-4 else temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: Mapping[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ApiError(
            400, f"'{name}' must be a number from {lo:g} to {hi:g}, got {value!r}", param=name
        )
    return float(value)


def _stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOPS
        or not all(isinstance(x, str) and x for x in stops)
    ):
        raise ApiError(
            400, f"'stop' must be a non-empty string or a list of up to {MAX_STOPS}", param="stop"
        )
    return tuple(stops)


# --- answering ----------------------------------------------------------------------------


async def _complete(
    request: Request,
    engine: Any,
    settings: Settings,
    body: Mapping[str, Any],
    prompt: _Prompt,
    *,
    chat: bool,
) -> Response:
    sampling = _sampling(body, len(prompt.ids), settings)
    stops = _stops(body.get("stop"))
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _wrong_type("stream", "true or false", stream)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _wrong_type("stream_options", "an object", options)
    usage_chunk = bool(options.get("include_usage"))
    events: asyncio.Queue[Event] = asyncio.Queue()
    job = Job(prompt.ids, sampling, _emitter(events), stop=stops, inputs=prompt.inputs)
    try:
        engine.submit(job)
    except QueueFull as error:
        raise ApiError(503, str(error), kind="server_error", code="queue_full") from None
    except EngineClosed as error:
        raise ApiError(503, str(error), kind="server_error", code="shutting_down") from None
    except DevicemapError as error:
        raise ApiError(400, str(error)) from None
    reply = _Reply(chat, settings.model_id)
    if stream:
        return StreamingResponse(
            _sse(reply, events, job, usage_chunk),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    texts: list[str] = []
    while True:
        try:
            event = await asyncio.wait_for(events.get(), _POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel()  # nobody to answer: free the row
                return Response(status_code=499)
            continue
        if event.kind == "text":
            texts.append(event.text)
        elif event.kind == "error":
            return _failure(event.error).response()
        else:
            return JSONResponse(reply.whole("".join(texts), event))


def _emitter(events: asyncio.Queue[Event]) -> Callable[[Event], None]:
    """Hands the engine thread's events to this request's queue on the event loop."""
    loop = asyncio.get_running_loop()

    def emit(event: Event) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server stopped
            loop.call_soon_threadsafe(events.put_nowait, event)

    return emit


def _failure(error: BaseException | None) -> ApiError:
    message = str(error) if error is not None else "the model failed"
    return ApiError(500, message, kind="server_error", code="generation_failed")


async def _sse(
    reply: _Reply, events: asyncio.Queue[Event], job: Job, usage_chunk: bool
) -> AsyncIterator[str]:
    """The reply as server-sent events; a client that goes away cancels the job."""
    try:
        if reply.chat:
            yield _data(reply.chunk({"role": "assistant", "content": ""}, None))
        while True:
            event = await events.get()
            if event.kind == "text":
                yield _data(reply.chunk({"content": event.text}, None, text=event.text))
            elif event.kind == "error":
                yield _data(_failure(event.error).body())
                break
            else:
                yield _data(reply.chunk({}, event.finish_reason))
                if usage_chunk:
                    yield _data({**reply.chunk({}, None), "choices": [], "usage": _usage(event)})
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # a no-op once finished; frees the row when the client went away


def _data(obj: Mapping[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(event: Event) -> dict[str, int]:
    return {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.prompt_tokens + event.completion_tokens,
    }


class _Reply:
    """OpenAI's response objects for one request."""

    def __init__(self, chat: bool, model: str):
        self.chat = chat
        self.model = model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, delta: dict[str, Any], finish: str | None, *, text: str = "") -> dict[str, Any]:
        if self.chat:
            choice, head = _choice(delta=delta, finish=finish), "chat.completion.chunk"
        else:
            choice, head = _choice(text=text, finish=finish), "text_completion"
        return {**self._head(head), "choices": [choice]}

    def whole(self, text: str, end: Event) -> dict[str, Any]:
        if self.chat:
            message = {"role": "assistant", "content": text}
            choice, head = _choice(message=message, finish=end.finish_reason), "chat.completion"
        else:
            choice, head = _choice(text=text, finish=end.finish_reason), "text_completion"
        return {**self._head(head), "choices": [choice], "usage": _usage(end)}


def _choice(*, finish: str | None, **body: Any) -> dict[str, Any]:
    """One choice: index 0, its delta / message / text, no logprobs, its finish_reason."""
    return {"index": 0, **body, "logprobs": None, "finish_reason": finish}


def _model_card(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "devicemap"}


def known_names(names: Sequence[str]) -> tuple[str, ...]:
    """Distinct non-empty names, in order."""
    return tuple(dict.fromkeys(n for n in names if n))
