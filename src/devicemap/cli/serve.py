"""The `serve` command: plan for --max-batch sequences, load, and serve the OpenAI API
(serve/app.py) with uvicorn until Ctrl-C or SIGTERM; main.py registers it."""

from __future__ import annotations

import errno
import os
import signal
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..errors import BadOption
from .commands import (
    INTERRUPTED,
    PlanFileOpt,
    command_errors,
    load_processor,
    open_model,
    session,
    stderr,
)
from .options import ModelArg, PlanChoices, options_from

if TYPE_CHECKING:
    from ..run.ranks import Ranks

HostOpt = Annotated[str, typer.Option("--host", help="Address to listen on.")]
PortOpt = Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on.")]
QueueOpt = Annotated[
    int, typer.Option("--queue", min=0, help="Requests that may wait for a free row (then 503).")
]
ApiKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="DEVICEMAP_API_KEY",
        help="Require 'Authorization: Bearer KEY' on /v1 (also $DEVICEMAP_API_KEY).",
        show_default=False,
    ),
]
NameOpt = Annotated[
    str | None,
    typer.Option("--name", help="The model id clients send. Default: the model's name."),
]
SERVE_CONTEXT = 4096  # tokens per sequence when --context is not given (the model's own if less)


@dataclass(frozen=True)
class ServePlanChoices(PlanChoices):
    """The planning options, --batch being the rows decoded together."""

    context: Annotated[
        int | None,
        typer.Option(
            "--context",
            "-c",
            help=f"Tokens per sequence (prompt + reply). Default {SERVE_CONTEXT} (or the"
            " model's longest, if less).",
        ),
    ] = None
    batch: Annotated[
        int,
        typer.Option(
            "--max-batch",
            "--batch",
            "-b",
            min=1,
            help="Requests decoded together, one forward per step; the plan budgets the KV"
            " cache of all of them.",
        ),
    ] = 4


@options_from(planning=ServePlanChoices)
def serve_command(
    ctx: typer.Context,
    model: ModelArg = None,
    *,
    planning: PlanChoices,
    plan_file: PlanFileOpt = None,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
    queue: QueueOpt = 64,
    api_key: ApiKeyOpt = None,
    name: NameOpt = None,
) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API, batching concurrent requests.

    POST /v1/chat/completions, /v1/completions (stream: true for server-sent events),
    GET /v1/models, /health. Ctrl-C or SIGTERM ends the streams in flight and exits.
    """
    with command_errors():
        if api_key is not None and not api_key.strip():
            raise BadOption("--api-key is empty: give a key, or leave it out", options=("api_key",))
        from .ranked import joined

        ranks = joined()  # torchrun: rank 0 serves, the other ranks run its steps with it
        if ranks is not None and ranks.rank != 0:
            follow(ctx, model, planning, ranks)
            return
        listener = bind(host, port)  # before the long load: a taken port fails at once
        try:
            serve(ctx, model, planning, listener, ranks, queue=queue, api_key=api_key, name=name)
        finally:
            listener.close()


def follow(ctx: typer.Context, model: str | None, planning: PlanChoices, ranks: Ranks) -> None:
    """A rank other than 0: load its stage and run rank 0's engine steps until it stops."""
    from ..run.ranks import leave
    from ..serve.engine import Engine

    source, tokenizer = open_model(model, planning, plan_file=ctx.params.get("plan_file"))
    with session(ctx, planning, source, tokenizer, context=SERVE_CONTEXT, ranks=ranks) as s:
        s.load()
        engine = Engine(s.model, tokenizer, max_batch=s.plan.options.batch, ranks=ranks)
        stderr.print(f"rank {ranks.rank}: serving rank 0's requests")
        engine.follow()
    leave()


def serve(
    ctx: typer.Context,
    model: str | None,
    planning: PlanChoices,
    listener: socket.socket,
    ranks: Ranks | None,
    *,
    queue: int,
    api_key: str | None,
    name: str | None,
) -> None:
    import uvicorn

    from ..run.dispatch import release
    from ..serve.app import Settings, create_app, known_names
    from ..serve.engine import Engine

    source, tokenizer = open_model(model, planning, plan_file=ctx.params.get("plan_file"))
    with session(ctx, planning, source, tokenizer, context=SERVE_CONTEXT, ranks=ranks) as s:
        rows = s.plan.options.batch
        s.load()
        processor, no_images = _processor(s, planning.trust_remote_code)
        model_id = name or served_name(model)
        settings = Settings(
            model_id=model_id,
            tokenizer=tokenizer,
            context=s.plan.options.context,
            limit=s.skeleton.max_positions,
            processor=processor,
            no_images=no_images,
            api_key=api_key,
            aliases=known_names(
                [s.source.name, str(s.source.root), os.path.basename(model_id.rstrip("/"))]
            ),
        )
        engine = Engine(
            s.model,
            tokenizer,
            max_batch=rows,
            queue_size=queue,
            ranks=ranks,
            on_failure=lambda: os.kill(os.getpid(), signal.SIGTERM),  # another rank is gone
        )
        config = uvicorn.Config(
            create_app(engine, settings),
            log_level="warning",
            timeout_graceful_shutdown=30,
            lifespan="off",
        )
        server = _server(config, engine)
        address, bound = listener.getsockname()[:2]
        stderr.print(
            f"serving {model_id} on http://{address}:{bound}/v1: up to {rows} requests decoded"
            f" together, {settings.context} tokens each; Ctrl-C stops"
        )
        try:
            server.run(sockets=[listener])
        finally:
            engine.close()
            release(s.model)
            s.model = None
    if engine.failure is not None:
        raise engine.failure
    if ranks is not None:
        from ..run.ranks import leave

        leave()
    stderr.print("server stopped")
    if server.signal == signal.SIGINT:
        raise typer.Exit(INTERRUPTED)


def _server(config: Any, engine: Any) -> Any:
    """uvicorn's Server, whose exit signal (Ctrl-C, SIGTERM) first ends every request in
    flight: their streams finish with finish_reason "abort" and [DONE], so the graceful
    shutdown that follows does not wait for long generations."""
    import uvicorn

    class Server(uvicorn.Server):  # type: ignore[misc]
        signal: int | None = None  # the signal that stopped it

        def handle_exit(self, sig: int, frame: Any) -> None:
            engine.close(wait=False)
            super().handle_exit(sig, frame)
            # uvicorn raises the signal again once shut down, which would kill the process
            # before the model is released: the command ends itself instead (SIGINT: 130)
            self._captured_signals.clear()
            self.signal = self.signal or sig

    return Server(config)


def served_name(typed: str | None) -> str:
    """The model id clients send: what was typed (a hub id, a path as given), the demo
    model's name without one."""
    if typed:
        return typed
    from .demo import DEMO_NAME

    return DEMO_NAME


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port; BadOption naming the port when it is taken."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise BadOption(
            f"--host {host}: not an address here ({error})", options=("host",)
        ) from None
    family, kind, proto, _, address = info[0]
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(address)
        listener.listen(128)
    except OSError as error:
        listener.close()
        if error.errno == errno.EADDRINUSE:
            raise BadOption(
                f"port {port} on {host} is in use: stop what listens there, or pick another with"
                " --port",
                options=("port",),
            ) from None
        raise BadOption(
            f"cannot listen on {host}:{port}: {error.strerror}", options=("port",)
        ) from None
    return listener


def _processor(s: Any, trust_remote_code: bool) -> tuple[Any, str]:
    """The processor for image content parts, or None and why (a text-only model)."""
    if not s.plan.options.images:
        return None, f"{s.source.name} does not take images (a text-only model)"
    try:
        return load_processor(s.source, trust_remote_code=trust_remote_code), ""
    except BadOption as error:
        return None, str(error).split(":")[0].replace("--image needs", "images need")
