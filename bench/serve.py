"""Serving k concurrent clients, 75% of the blocks on disk, CPU execution: devicemap serve
vs transformers + accelerate.

Aggregate generated tokens/s (every client's completion tokens / wall time) at 1, 4 and 16
clients, each client sending `--requests` requests back to back (greedy, `--tokens` tokens
each, prompts of 30-90 tokens that differ per request):

- devicemap: `python -m devicemap serve` in a subprocess, planned with bench/decode.py's
  options (the last 75 % of the decoder layers pinned to disk, `--offload-exec cpu`,
  context 512) and `--max-batch` the most clients; the disk tier (a few hundred MB) stays
  in the page cache, as accelerate's does (`--page-cache SIZE` gives devicemap's option).
  The clients are threads POSTing to /v1/completions (http.client, one keep-alive
  connection each); tokens are counted from each reply's `usage.completion_tokens`.
- the alternative, transformers + accelerate on the same device map (devicemap's plan for
  that batch, `device_map=plan.device_map`, disk entries through `offload_folder`), in
  this process. `transformers serve` is not it: it takes one `--device` string
  (`auto`, `cpu`, `cuda:0`), passed as `device_map` with no `offload_folder` nor
  max_memory, so it cannot put blocks on disk (on this CPU machine `auto` keeps the whole
  model in RAM, which is not the setting measured). What a transformers user can do is
  `generate` on the dispatched model, measured two ways:
  - `acc_seq`: requests answered one at a time (a server without batching): the k x
    `--requests` requests, one `generate` each;
  - `acc_batch`: static batching, `--requests` rounds of one `generate` over the k
    prompts, left-padded (every reply has the same length here, so no row waits on
    another: the best case of static batching).

Rounds alternate the engines at every client count (the server idles while accelerate
runs), `--runs` rounds, medians. The model is a random llama (bench/models.py) served from a
temporary directory of its own (links to the weights, a byte-level tokenizer, no
end-of-sequence id: every reply is `--tokens` long; the cached model is left as it is).
Columns: `E_tok_s` the rate of engine E, `dm_active` the mean number of requests the server
was decoding (sampled from /health), `dm/acc_*` devicemap's rate over each alternative's,
`E/1cl` E's rate over its own at the fewest clients. Targets: dm/1cl >= 4 at 16 clients,
dm/acc_seq >= 3 at 16 clients.

    python bench/serve.py                               # smollm fp32, 1/4/16 clients
    python bench/serve.py --model tinyllama --runs 2
    python bench/serve.py --clients 1,4 --tokens 8 --requests 1 --runs 1   # a quick check
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import devicemap
from decode import MODELS, load_accelerate, plan_options
from models import bench_model
from report import median, write

_READY = re.compile(r"serving \S+ on http://([^\s:/]+):(\d+)/v1")
ENGINES = ("dm", "acc_seq", "acc_batch")


# --- the model directory -------------------------------------------------------------------


def byte_tokenizer() -> Any:
    """257 tokens: <pad>, then one per byte; no end-of-sequence token."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<pad>", padding_side="left"
    )


def serving_dir(model: Path, into: Path) -> Path:
    """A directory to serve `model` from: its weight files linked, its configs copied with
    no end-of-sequence id (a random model may pick any token: replies must not stop short),
    and a byte-level tokenizer (the bench models have none)."""
    into.mkdir()
    for file in model.iterdir():
        if file.name in ("config.json", "generation_config.json"):
            config = json.loads(file.read_text())
            config["eos_token_id"] = None
            (into / file.name).write_text(json.dumps(config, indent=2))
        else:
            (into / file.name).symlink_to(file.resolve())
    byte_tokenizer().save_pretrained(into)
    return into


def prompt(client: int, request: int) -> str:
    """A different prompt per request, 30 to 90 bytes (= tokens)."""
    return f"Client {client}, request {request}: " + "tell me more. " * (1 + (client + request) % 5)


# --- devicemap serve -----------------------------------------------------------------------


def planning(model: Path, fraction: float, page_cache: str) -> dict[str, Any]:
    """bench/decode.py's planning options, with `page_cache` ("default": devicemap's)."""
    options = plan_options(model, fraction)
    if page_cache != "default":
        options["page_cache"] = page_cache
    return options


def serve_command(
    model: Path, dtype: torch.dtype, options: dict[str, Any], batch: int
) -> list[str]:
    """The `devicemap serve` command line with these planning options."""
    cmd = [sys.executable, "-m", "devicemap", "serve", str(model), "--name", "bench",
           "--host", "127.0.0.1", "--port", "0", "--max-batch", str(batch),
           "--queue", str(2 * batch), "--dtype", str(dtype).removeprefix("torch."),
           "--offload-exec", options["offload_exec"],
           "--context", str(options["context"])]  # fmt: skip
    for device, size in options["max_memory"].items():
        cmd += ["--max-memory", f"{device}={size}"]
    for module, device in options["pins"].items():
        cmd += ["--pin", f"{module}={device}"]
    if "page_cache" in options:
        cmd += ["--page-cache", options["page_cache"]]
    return cmd


@contextlib.contextmanager
def server(cmd: list[str], timeout: float = 900) -> Iterator[tuple[str, int, list[str]]]:
    """Start `cmd`, yield (host, port, its output lines so far) once it serves; always
    stopped at the end (SIGTERM, then SIGKILL after 30 s)."""
    env = {**os.environ, "COLUMNS": "400", "NO_COLOR": "1"}  # no wrapped status lines
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines: list[str] = []
    ready = threading.Event()
    found: list[tuple[str, int]] = []

    def drain() -> None:  # read all along: a full pipe would block the server
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            if not found and (match := _READY.search(line)):
                found.append((match[1], int(match[2])))
                ready.set()
        ready.set()  # exited

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        ready.wait(timeout)
        if not found:
            tail = "\n".join(lines[-20:])
            raise RuntimeError(f"devicemap serve did not start (exit {proc.poll()}):\n{tail}")
        yield found[0][0], found[0][1], lines
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reader.join(5)


def get(host: str, port: int, path: str) -> Any:
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def wait_idle(host: str, port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = get(host, port, "/health")
        if not health["active"] and not health["waiting"]:
            return
        time.sleep(0.1)
    raise RuntimeError(f"the server is still busy after {timeout:.0f} s: {health}")


def complete(conn: http.client.HTTPConnection, text: str, tokens: int) -> int:
    """One /v1/completions request; its completion tokens."""
    body = {"model": "bench", "prompt": text, "max_tokens": tokens, "temperature": 0}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    reply = json.loads(response.read())
    if response.status != 200:
        raise RuntimeError(f"/v1/completions answered {response.status}: {reply}")
    return int(reply["usage"]["completion_tokens"])


def dm_rate(host: str, port: int, clients: int, requests: int, tokens: int) -> dict[str, float]:
    """Aggregate tok/s of `clients` threads sending `requests` requests each, and the mean
    number of requests the server had active (sampled from /health)."""
    wait_idle(host, port)
    counts = [0] * clients
    errors: list[BaseException] = []
    start = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        conn = http.client.HTTPConnection(host, port, timeout=3600)
        try:
            start.wait()
            for r in range(requests):
                counts[c] += complete(conn, prompt(c, r), tokens)
        except BaseException as error:  # reported by the main thread
            errors.append(error)
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    begin = time.perf_counter()
    active: list[int] = []
    while any(t.is_alive() for t in threads):
        active.append(get(host, port, "/health")["active"])
        for t in threads:
            t.join(0.25 / clients)
    wall = time.perf_counter() - begin
    if errors:
        raise errors[0]
    short = sum(counts) < clients * requests * tokens
    if short:
        print(f"  warning: devicemap generated {sum(counts)} of {clients * requests * tokens}")
    return {"tok_s": sum(counts) / wall, "active": sum(active) / max(len(active), 1)}


# --- transformers + accelerate -------------------------------------------------------------


def generate(model: Any, tok: Any, texts: list[str], tokens: int) -> int:
    """One greedy `generate` over `texts` (left-padded); tokens generated."""
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(
            **batch, max_new_tokens=tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
    return int(out.shape[0] * (out.shape[1] - batch.input_ids.shape[1]))


def acc_rate(
    model: Any, tok: Any, clients: int, requests: int, tokens: int, *, batched: bool
) -> float:
    """Aggregate tok/s serving `clients` x `requests` requests: one at a time, or each round
    of the clients' requests in one padded `generate`."""
    begin, done = time.perf_counter(), 0
    for r in range(requests):
        texts = [prompt(c, r) for c in range(clients)]
        if batched:
            done += generate(model, tok, texts, tokens)
        else:
            done += sum(generate(model, tok, [t], tokens) for t in texts)
    return done / (time.perf_counter() - begin)


# --- the benchmark -------------------------------------------------------------------------


def bench(args: argparse.Namespace, tmp: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    dtype = MODELS[args.model]
    clients = [int(c) for c in args.clients.split(",")]
    most = max(clients)
    path = serving_dir(bench_model(args.model, dtype), tmp / f"{args.model}-serve")
    tok = byte_tokenizer()
    options = planning(path, args.fraction, args.page_cache)
    plan = devicemap.plan(path, dtype=dtype, batch=most, **options)
    device_map = dict(plan.device_map)
    acc = load_accelerate(path, dtype, device_map, str(tmp / "offload"))
    cmd = serve_command(path, dtype, options, most)
    rates: dict[tuple[str, int], list[float]] = {(e, k): [] for e in ENGINES for k in clients}
    active: dict[int, list[float]] = {k: [] for k in clients}
    with server(cmd) as (host, port, lines):
        print("\n".join(f"  | {line}" for line in lines if line.strip()))
        dm_rate(host, port, 1, 1, args.tokens)  # warm-up: page cache, first-request costs
        generate(acc, tok, [prompt(0, 0)], args.tokens)
        for run in range(args.runs):
            for k in clients:
                dm = dm_rate(host, port, k, args.requests, args.tokens)
                rates["dm", k].append(dm["tok_s"])
                active[k].append(dm["active"])
                seq = acc_rate(acc, tok, k, args.requests, args.tokens, batched=False)
                rates["acc_seq", k].append(seq)
                batch = acc_rate(acc, tok, k, args.requests, args.tokens, batched=True)
                rates["acc_batch", k].append(batch)
                print(
                    f"  run {run + 1}, {k} clients: dm {dm['tok_s']:.3g} tok/s (active"
                    f" {dm['active']:.2g}), acc_seq {seq:.3g}, acc_batch {batch:.3g}"
                )
    del acc
    gc.collect()
    rate = {key: median(v) for key, v in rates.items()}
    fewest = min(clients)
    rows = []
    for k in clients:
        row: dict[str, Any] = {"model": f"{args.model} {str(dtype)[6:]}", "clients": k}
        row.update({f"{e}_tok_s": rate[e, k] for e in ENGINES})
        row["dm_active"] = median(active[k])
        row["dm/acc_seq"] = rate["dm", k] / rate["acc_seq", k]
        row["dm/acc_batch"] = rate["dm", k] / rate["acc_batch", k]
        row.update({f"{e}/{fewest}cl": rate[e, k] / rate[e, fewest] for e in ENGINES})
        rows.append(row)
    scaling = rate["dm", most] / rate["dm", fewest]
    versus = rate["dm", most] / rate["acc_seq", most]
    notes = {
        "serve_command": " ".join(cmd[1:]).replace(str(path), f"<{args.model} dir>"),
        "on_disk": f"{args.fraction:.0%} of the decoder layers",
        "disk_tier": " ".join(r for r in plan.reasons if "page cache" in r),
        "target_dm_scaling": f"dm at {most} clients / {fewest}: {scaling:.3g} (target >= 4)",
        "target_dm_vs_acc": f"dm / acc_seq at {most} clients: {versus:.3g} (target >= 3)",
    }
    return rows, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm", choices=sorted(MODELS))
    parser.add_argument("--clients", default="1,4,16", help="concurrent clients, each count")
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens of each request")
    parser.add_argument("--runs", type=int, default=3, help="rounds of every engine (median)")
    parser.add_argument("--fraction", type=float, default=0.75, help="decoder layers on disk")
    parser.add_argument(
        "--page-cache",
        default="default",
        help="devicemap's --page-cache; 'default': its own (free RAM beyond the plan's cpu use)",
    )
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    tmp = Path(tempfile.mkdtemp(prefix="devicemap-bench-serve-"))
    try:
        rows, notes = bench(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    notes["command"] = "python bench/serve.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
    )
    write("serve", rows, notes=notes)


if __name__ == "__main__":
    main()
