"""Run sweep jobs on a few reused worker processes, each job under a timeout.

A worker that crashes or overruns is killed and replaced; its job is reported as
"crash" / "timeout" and the others go on. Imports (torch, transformers: ~3 s) are paid
once per worker, not once per model.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent.parent


class _Worker:
    def __init__(self, root: Path):
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sweep.worker", str(root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=TESTS,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.ready = self._next(timeout=120) is not None

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _next(self, timeout: float) -> dict[str, Any] | None:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            return None
        return json.loads(line) if line else None

    def run(self, job: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.process.stdin is not None
        start = time.perf_counter()
        try:
            self.process.stdin.write(json.dumps(job) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            return {**job, "status": "crash", "error": "worker died", "seconds": 0.0}
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            line = ""  # still running: overran
        if line:
            return json.loads(line)  # type: ignore[no-any-return]
        self.kill()
        seconds = round(time.perf_counter() - start, 2)
        status, error = ("timeout", f"over {timeout} s") if line == "" else ("crash", "")
        error = error or f"worker died (exit status {self.process.returncode})"
        return {**job, "status": status, "error": error, "seconds": seconds}

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()


def run_jobs(
    jobs: Iterable[dict[str, Any]], root: Path, *, workers: int = 2, timeout: float = 60
) -> Iterator[dict[str, Any]]:
    """Results of `jobs` as they finish (any order), on `workers` reused processes."""
    todo: queue.Queue[dict[str, Any]] = queue.Queue()
    for job in jobs:
        todo.put(job)
    done: queue.Queue[dict[str, Any] | None] = queue.Queue()

    def serve() -> None:
        worker = _Worker(root)
        try:
            while True:
                try:
                    job = todo.get_nowait()
                except queue.Empty:
                    return
                if not worker.ready:
                    done.put(
                        {**job, "status": "crash", "error": "worker did not start", "seconds": 0}
                    )
                    continue
                result = worker.run(job, timeout)
                done.put(result)
                if result["status"] in ("timeout", "crash"):
                    worker.kill()
                    worker = _Worker(root)
        finally:
            worker.close()
            done.put(None)

    threads = [threading.Thread(target=serve, daemon=True) for _ in range(workers)]
    for thread in threads:
        thread.start()
    running = len(threads)
    while running:
        item = done.get()
        if item is None:
            running -= 1
        else:
            yield item
