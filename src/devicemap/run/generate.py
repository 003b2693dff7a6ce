"""Streaming generation on a loaded transformers model: prompts, sampling options, chat.

transformers' `generate` does the decoding, in a worker thread; this module hands its
tokens to the caller as text pieces as they arrive, times prefill and decode, and
stops the worker within one decoding step when the caller stops reading (Ctrl-C,
`close()`, leaving a `with` block).
"""

from __future__ import annotations

import math
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..errors import (
    BadOption,
    ConfigError,
    ContextTooLong,
    DevicemapError,
    GenerationFailed,
    TemplateError,
)

Message = Mapping[str, str]  # {"role": "user" | "assistant" | "system", "content": text}
FinishReason = Literal["stop", "length", "interrupted"]
_HOLD_TOKENS = 4  # tokens a piece ending in U+FFFD waits for the rest of its character

_POLL_S = 0.1  # seconds between checks of the token queue; keeps Ctrl-C prompt on every OS
_CONTEXT_STEP = 256  # tokens; suggested --context values are rounded up to this
# a character standing for a byte that was not UTF-8 (Python's surrogate escapes, as in
# sys.argv) or half a UTF-16 pair: no tokenizer encodes these
_SURROGATE = re.compile("[\ud800-\udfff]")


# --- options -----------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """How to pick each new token. temperature 0 is greedy (argmax); the others are then unused."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens with this much probability
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    repetition_penalty: float = 1.0  # > 1 discourages repeats; 1 = off
    seed: int | None = None  # makes sampling reproducible

    def __post_init__(self) -> None:
        problems = _sampling_problems(self)
        if problems:
            raise BadOption("; ".join(problems.values()), options=tuple(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


MIN_TEMPERATURE = 1e-4  # logits / 1e-300 are inf: sampling would fail on a NaN distribution


def _sampling_problems(s: Sampling) -> dict[str, str]:
    """option name -> what is wrong with it, for every bad option."""
    checks = {
        "max_new_tokens": (_is_int(s.max_new_tokens) and s.max_new_tokens >= 1, "an integer ≥ 1"),
        "temperature": (
            _is_real(s.temperature) and (s.temperature == 0 or s.temperature >= MIN_TEMPERATURE),
            f"0 (greedy) or ≥ {MIN_TEMPERATURE}",  # below, logits / t overflow to inf
        ),
        "top_p": (_is_real(s.top_p) and 0 < s.top_p <= 1, "in (0, 1] (1 = off)"),
        "top_k": (_is_int(s.top_k) and s.top_k >= 0, "an integer ≥ 0 (0 = off)"),
        "repetition_penalty": (
            _is_real(s.repetition_penalty) and s.repetition_penalty > 0,
            "> 0 (1 = off)",
        ),
        "seed": (
            s.seed is None or (_is_int(s.seed) and 0 <= s.seed < 2**63),
            "an integer from 0 to 2^63 - 1, or None",
        ),
    }
    return {
        name: f"{name} must be {valid}, got {getattr(s, name)!r}"
        for name, (ok, valid) in checks.items()
        if not ok
    }


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_context(
    input_len: int, max_new_tokens: int, context: int, *, limit: int | None = None
) -> None:
    """Raise ContextTooLong unless the prompt and the new tokens fit the planned context.

    `limit` is the model's own longest context: a suggested --context never exceeds it.
    """
    total = input_len + max_new_tokens  # tokens
    suggest = -(-total // _CONTEXT_STEP) * _CONTEXT_STEP
    if limit is not None and total > limit:
        fix = (
            f"lower --max-new-tokens to {limit - input_len}"
            if input_len < limit
            else "shorten the prompt"
        )
        raise ContextTooLong(
            f"prompt is {input_len} tokens + {max_new_tokens} new = {total}, but the model holds"
            f" at most {limit} tokens; {fix}"
        )
    if input_len >= context:
        raise ContextTooLong(
            f"prompt is {input_len} tokens, the plan holds {context}; re-plan with "
            f"--context {suggest} (prompt + {max_new_tokens} new tokens), or shorten the prompt"
        )
    if total > context:
        raise ContextTooLong(
            f"prompt is {input_len} tokens + {max_new_tokens} new = {total}, the plan holds "
            f"{context}; lower --max-new-tokens to {context - input_len} or re-plan with "
            f"--context {suggest}"
        )


# --- prompts -----------------------------------------------------------------


def build_prompt(
    tokenizer: Any, prompt: str | Sequence[Message], *, raw: bool = False
) -> torch.Tensor:
    """Token ids [1, T] (int64), through the chat template if the tokenizer has one, unless raw.

    Characters that stand for bytes that were not UTF-8 become U+FFFD (`replace_undecodable`)."""
    if raw or not getattr(tokenizer, "chat_template", None):
        text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
        text, _ = replace_undecodable(text)
        ids = tokenizer(text, return_tensors="pt").input_ids
    else:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text, _ = replace_undecodable(apply_template(tokenizer, messages))
        # the template writes its own special tokens (BOS included, where the model wants one)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    if ids.shape[-1] == 0:
        raise BadOption("the prompt is empty: give at least one token of text", options=("prompt",))
    return ids  # type: ignore[no-any-return]


def replace_undecodable(text: str) -> tuple[str, int]:
    """`text` with every character that stands for a byte that was not UTF-8 (a surrogate
    escape: sys.argv, or a stream read with errors="surrogateescape") or for half a UTF-16 pair
    replaced by U+FFFD, and how many were replaced."""
    return _SURROGATE.subn("\ufffd", text)


def apply_template(owner: Any, messages: Sequence[Mapping[str, Any]]) -> str:
    """The chat template of `owner` (a tokenizer or processor) applied to `messages`, ending
    with the generation prompt, as text. A template that fails (raise_exception, a syntax
    error, an undefined name) is a TemplateError saying what to do instead."""
    import jinja2

    try:
        text = _rendered(owner, messages)
    except TemplateError:
        raise
    except jinja2.TemplateError as error:
        raise _template_error(error, messages) from None
    except (OverflowError, RecursionError, TypeError, ValueError, AssertionError) as error:
        # the template ran, and failed in a filter or a loop Jinja's sandbox let it start
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise TemplateError(
            f"the model's chat template failed ({type(error).__name__}: {reason}): fix"
            " chat_template in its tokenizer_config.json (or chat_template.jinja), or feed the"
            " prompt without the template: raw=True (--raw on `devicemap run`)"
        ) from None
    if len(text) > MAX_PROMPT_CHARS:
        raise TemplateError(
            f"the model's chat template made a prompt of {len(text)} characters, more than any"
            " context holds: fix chat_template, or feed the prompt without the template:"
            " raw=True (--raw on `devicemap run`)"
        )
    return text


TEMPLATE_SECONDS = 20.0  # a chat template renders in milliseconds; one still running is stuck
MAX_PROMPT_CHARS = 16 << 20  # characters of a rendered prompt: far past any context


def _rendered(owner: Any, messages: Sequence[Mapping[str, Any]]) -> str:
    """apply_chat_template in a worker thread, waited for TEMPLATE_SECONDS at most: Jinja's
    sandbox caps each loop at 100,000 steps but not loops inside loops, so a hostile template
    could hang the caller. A stuck render is left running in its daemon thread (Python cannot
    stop it) and reported as a TemplateError."""
    done: dict[str, Any] = {}

    def render() -> None:
        try:
            done["text"] = str(
                owner.apply_chat_template(
                    [dict(m) for m in messages], add_generation_prompt=True, tokenize=False
                )
            )
        except BaseException as error:  # handed to the caller, who raises it
            done["error"] = error

    worker = threading.Thread(target=render, name="devicemap-template", daemon=True)
    worker.start()
    worker.join(TEMPLATE_SECONDS)
    if worker.is_alive():
        raise TemplateError(
            f"the model's chat template was still running after {TEMPLATE_SECONDS:.0f} s (a"
            " loop without end?): fix chat_template, or feed the prompt without the template:"
            " raw=True (--raw on `devicemap run`)"
        )
    if "error" in done:
        raise done["error"]
    return str(done["text"])


def _template_error(error: Exception, messages: Sequence[Mapping[str, Any]]) -> TemplateError:
    import jinja2

    reason = " ".join(str(error).split()) or type(error).__name__  # one line
    skip = "feed the prompt without the template: raw=True (--raw on `devicemap run`)"
    if isinstance(error, jinja2.TemplateSyntaxError):
        line = f", line {error.lineno}" if error.lineno else ""
        return TemplateError(
            f"the model's chat template is not valid Jinja ({reason}{line}): fix chat_template"
            f" in its tokenizer_config.json (or chat_template.jinja), or {skip}"
        )
    if "system" in reason.lower() and any(m.get("role") == "system" for m in messages):
        return TemplateError(
            f"this model's chat template does not support a system prompt: omit --system (the"
            f" template says {reason!r})"
        )
    return TemplateError(f"the model's chat template failed on these messages ({reason}); {skip}")


def build_image_prompt(
    processor: Any, messages: Sequence[Message], images: Sequence[Any]
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Token ids [1, T] and the other model inputs (pixel_values, ...) for a chat whose last
    user turn shows `images`: the processor's chat template puts one image entry per image
    before the text, and the processor expands each into the model's image tokens."""
    turns: list[dict[str, Any]] = [dict(m) for m in messages]
    last = turns[-1]
    last["content"] = [
        *({"type": "image"} for _ in images),
        {"type": "text", "text": last["content"]},
    ]
    for turn in turns[:-1]:
        turn["content"] = [{"type": "text", "text": turn["content"]}]
    marker = getattr(processor, "image_token", None)
    tokenizer: Any = getattr(processor, "tokenizer", None)
    if getattr(processor, "chat_template", None):
        text = apply_template(processor, turns)
    elif isinstance(marker, str) and getattr(tokenizer, "chat_template", None):
        # no template of its own: the tokenizer's, the processor's image marker per image
        plain = [dict(m) for m in messages]
        plain[-1]["content"] = "".join(f"{marker}\n" for _ in images) + plain[-1]["content"]
        text = apply_template(tokenizer, plain)
    else:
        raise BadOption(
            "the model's processor has neither a chat template nor an image token, so devicemap"
            " cannot tell where the image goes in the prompt",
            options=("image",),
        )
    text, _ = replace_undecodable(text)
    try:  # the template wrote the special tokens already
        batch = processor(
            text=text, images=list(images), return_tensors="pt", add_special_tokens=False
        )
    except TypeError:  # a processor that takes no tokenizer options
        batch = processor(text=text, images=list(images), return_tensors="pt")
    data = dict(batch)
    ids = data.pop("input_ids")
    data.pop("attention_mask", None)
    return ids, data


# --- streaming ---------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One generated reply and how long it took."""

    text: str
    token_ids: tuple[int, ...]  # the new tokens, end-of-sequence token included
    prompt_tokens: int
    prefill_s: float  # seconds from the call to the first new token (time to first token)
    decode_s: float  # seconds from the first new token to the last
    finish_reason: FinishReason

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: tokens after the first, per second of decoding (0 when unmeasurable)."""
        if self.new_tokens < 2 or self.decode_s <= 0:
            return 0.0
        return (self.new_tokens - 1) / self.decode_s


class _StopFlag(StoppingCriteria):  # type: ignore[misc]
    """Asked by `generate` after every new token: stop once the flag is set."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        flag = self.event.is_set()
        return torch.full((input_ids.shape[0],), flag, dtype=torch.bool, device=input_ids.device)


_END = object()  # queued by the worker when `generate` returns or fails


class _TokenQueue(BaseStreamer):  # type: ignore[misc]
    """Receives tokens from `generate` (in the worker) and queues (ids, time) for the reader."""

    def __init__(self) -> None:
        self.queue: queue.Queue[Any] = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate hands over the prompt first
            self._prompt_seen = True
            return
        self.queue.put((value.reshape(-1).tolist(), time.perf_counter()))

    def end(self) -> None:
        pass  # the worker queues _END itself, also when generate raises


class TextDecoder:
    """The text of a growing token sequence, handed out piece by piece in O(1) per token:
    each step decodes only the tokens since the last piece, after the piece before them as
    context (decoding them alone would lose a leading space or split a character), and
    returns what that adds. A piece ending in what may be half a character (U+FFFD) waits
    for at most _HOLD_TOKENS more tokens (a UTF-8 character needs at most 3 more bytes), so
    a reply of invalid bytes still streams."""

    def __init__(self, tokenizer: Any):
        self._decode = tokenizer.decode
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read]: the last piece handed out (the context)
        self._read = 0
        self._held = 0  # tokens added since the last piece

    def add(self, ids: Sequence[int]) -> str:
        """Add `ids`; the text they add (maybe '' while held back)."""
        self.ids.extend(ids)
        return self._piece(final=False)

    def flush(self) -> str:
        """The text held back, if any (the sequence has ended)."""
        return self._piece(final=True)

    def _piece(self, *, final: bool) -> str:
        before = self._decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        after = self._decode(self.ids[self._prefix :], skip_special_tokens=True)
        unsure = after.endswith("\ufffd") or not after.startswith(before)
        if unsure and not final and self._held < _HOLD_TOKENS:
            self._held += 1
            return ""
        self._prefix, self._read, self._held = self._read, len(self.ids), 0
        return str(after[len(before) :])


class ReplyStream(Iterator[str]):
    """Text pieces of a reply as they are generated; `.reply` once finished.

    Stop early with `close()` or a `with` block; an exception in the reader (Ctrl-C)
    while it waits for the next piece stops generation too.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        input_ids: torch.Tensor,
        sampling: Sampling,
        inputs: Mapping[str, Any] | None = None,
    ):
        check_vocabulary(model, input_ids)
        self._tokenizer = tokenizer
        self._sampling = sampling
        self._eos = eos_ids(model, tokenizer)
        self._prompt_tokens = int(input_ids.shape[-1])
        self._ids: list[int] = []
        self._times: list[float] = []  # perf_counter of each new token
        self._shown = ""  # text already handed out
        self._text = TextDecoder(tokenizer)
        self._reply: Reply | None = None
        self._callbacks: list[Callable[[Reply], None]] = []
        self._streamer = _TokenQueue()
        self._stop = _StopFlag()
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)  # the worker draws from the global generator
        kwargs = _generate_kwargs(model, input_ids, sampling, self._streamer, self._stop)
        device = kwargs["input_ids"].device
        kwargs.update({k: to_device(v, device) for k, v in (inputs or {}).items() if v is not None})
        self._start = time.perf_counter()
        self._worker = threading.Thread(
            target=_run_generate, args=(model, kwargs, self._streamer.queue), daemon=True
        )
        self._worker.start()

    def __iter__(self) -> ReplyStream:
        return self

    def __next__(self) -> str:
        try:
            while self._reply is None:
                piece = self._step()
                if piece:
                    return piece
        except BaseException:
            self.close()  # Ctrl-C or an error while waiting: stop the worker, keep what came
            raise
        raise StopIteration

    def __enter__(self) -> ReplyStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.event.set()  # an abandoned stream must not keep generating

    @property
    def reply(self) -> Reply:
        """The finished reply (waits for the worker, which stops promptly once closed)."""
        if self._reply is None:
            for _ in self:
                pass
        assert self._reply is not None
        return self._reply

    def on_finish(self, callback: Callable[[Reply], None]) -> None:
        """Call `callback(reply)` once the reply is finished (or now, if it is)."""
        if self._reply is not None:
            callback(self._reply)
        else:
            self._callbacks.append(callback)

    def close(self) -> None:
        """Stop generating (within one decoding step), wait for the worker, finish the reply."""
        if self._reply is not None:
            return
        self._stop.event.set()
        self._worker.join()
        while not self._streamer.queue.empty():
            item = self._streamer.queue.get_nowait()
            if isinstance(item, tuple):
                self._add(item)
        self._finish()

    def _step(self) -> str:
        """Take one item from the worker; return the text it adds (maybe '')."""
        item = self._get()
        if item is _END:
            self._worker.join()
            self._finish()
            text = self._reply.text if self._reply else ""
            return text[len(self._shown) :] if text.startswith(self._shown) else ""
        if isinstance(item, BaseException):
            self._worker.join()
            self._finish()
            if isinstance(item, (DevicemapError, KeyboardInterrupt)) or not isinstance(
                item, Exception
            ):
                raise item
            reason = " ".join(str(item).split())[:300] or type(item).__name__
            raise GenerationFailed(
                f"the model failed while generating ({type(item).__name__}: {reason}): a"
                " value in its config.json, or an input (image, prompt), that it cannot take"
            ) from item
        self._add(item)
        return self._new_text()

    def _get(self) -> Any:
        while True:
            try:
                return self._streamer.queue.get(timeout=_POLL_S)
            except queue.Empty:
                continue

    def _add(self, item: tuple[list[int], float]) -> None:
        ids, when = item
        self._ids.extend(ids)
        self._times.extend([when] * len(ids))

    def _new_text(self) -> str:
        """Text decoded since the last piece (TextDecoder: O(1) per token)."""
        piece = self._text.add(self._ids[len(self._text.ids) :])
        self._shown += piece
        return piece

    def _decode(self) -> str:
        return str(self._tokenizer.decode(self._ids, skip_special_tokens=True))

    def _finish(self) -> None:
        first = self._times[0] if self._times else time.perf_counter()
        last = self._times[-1] if self._times else first
        self._reply = Reply(
            text=self._decode(),
            token_ids=tuple(self._ids),
            prompt_tokens=self._prompt_tokens,
            prefill_s=first - self._start,
            decode_s=last - first,
            finish_reason=self._finish_reason(),
        )
        for callback in self._callbacks:
            callback(self._reply)

    def _finish_reason(self) -> FinishReason:
        if self._ids and self._ids[-1] in self._eos:
            return "stop"
        if len(self._ids) >= self._sampling.max_new_tokens:
            return "length"
        return "interrupted" if self._stop.event.is_set() else "stop"


def check_vocabulary(model: Any, input_ids: torch.Tensor) -> None:
    """ConfigError when the prompt holds a token id past the model's embedding table: the
    tokenizer is not this model's (the lookup would fail inside generate, or read garbage)."""
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    rows = getattr(embeddings, "num_embeddings", None)
    if isinstance(rows, int) and input_ids.numel() and int(input_ids.max()) >= rows:
        raise ConfigError(
            f"the tokenizer gave token id {int(input_ids.max())}, but the model's vocabulary has"
            f" {rows} entries: the tokenizer is not this model's; use the tokenizer files that"
            " came with the checkpoint"
        )


def stream_reply(
    model: Any,
    tokenizer: Any,
    input_ids: torch.Tensor,
    sampling: Sampling | None = None,
    *,
    inputs: Mapping[str, Any] | None = None,
) -> ReplyStream:
    """Start generating a reply to `input_ids` [1, T]; iterate the result for text pieces.
    `inputs`: more model inputs a processor made (pixel_values, image_sizes, ...)."""
    return ReplyStream(model, tokenizer, input_ids, sampling or Sampling(), inputs)


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors (also in lists) on `device`, so the model's entry hook finds them there."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


def _run_generate(model: Any, kwargs: dict[str, Any], out: queue.Queue[Any]) -> None:
    """Worker thread body: run generate; report a failure to the reader; always end the queue."""
    try:
        model.generate(**kwargs)
    except BaseException as error:  # handed to the reader, who raises it
        out.put(error)
    finally:
        out.put(_END)


def _generate_kwargs(
    model: Any, input_ids: torch.Tensor, s: Sampling, streamer: _TokenQueue, stop: _StopFlag
) -> dict[str, Any]:
    ids = input_ids.to(input_device(model))
    kwargs: dict[str, Any] = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=s.max_new_tokens,
        do_sample=not s.greedy,
        repetition_penalty=s.repetition_penalty,
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList([stop]),
    )
    if not s.greedy:  # greedy leaves them unset: do_sample=False ignores the model's defaults
        kwargs.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
    config = _generation_config(model)
    if config.pad_token_id is None and config.eos_token_id is not None:
        eos = config.eos_token_id
        kwargs["pad_token_id"] = eos[0] if isinstance(eos, list) else eos
    return kwargs


def input_device(model: Any) -> torch.device:
    """Where the token ids go: the embedding's device, or the CPU when it is offloaded."""
    weight = model.get_input_embeddings().weight
    return torch.device("cpu") if weight.device.type == "meta" else weight.device  # type: ignore[no-any-return]


def _generation_config(model: Any) -> Any:
    """The model's generation config; a custom model's own generate may keep none (then
    its language model's, or the defaults)."""
    from transformers import GenerationConfig

    config = getattr(model, "generation_config", None)
    return config if config is not None else GenerationConfig()


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = _generation_config(model).eos_token_id
    ids = set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


# --- chat --------------------------------------------------------------------


class Chat:
    """A multi-turn conversation: each `send` sees the whole history through the chat template."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        sampling: Sampling | None = None,
        system: str | None = None,
        context: int | None = None,  # tokens the plan holds; None = unchecked
        limit: int | None = None,  # the model's own longest context, if it has one
    ):
        self.model = model
        self.limit = limit
        self.tokenizer = tokenizer
        self.sampling = sampling or Sampling()
        self.system = system
        self.context = context
        self.messages: list[dict[str, str]] = []
        self.last_reply: Reply | None = None
        self._active: ReplyStream | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        if self._active is not None:
            self._active.close()
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.last_reply = None

    def send(self, text: str) -> ReplyStream:
        """Add a user turn and stream the reply; the reply joins the history once finished."""
        if self._active is not None:
            self._active.close()  # its (partial) reply joins the history first
        user = {"role": "user", "content": text}
        input_ids = build_prompt(self.tokenizer, [*self.messages, user])
        if self.context is not None:
            check_context(
                int(input_ids.shape[-1]), self.sampling.max_new_tokens, self.context,
                limit=self.limit,
            )  # fmt: skip
        stream = stream_reply(self.model, self.tokenizer, input_ids, self.sampling)
        stream.on_finish(lambda reply: self._remember(user, reply))
        self._active = stream
        return stream

    def _remember(self, user: dict[str, str], reply: Reply) -> None:
        self.messages += [user, {"role": "assistant", "content": reply.text}]
        self.last_reply = reply
        self._active = None  # only one stream is ever active
