"""`devicemap serve` in a subprocess on 127.0.0.1, for the tests (test_serve, test_demo)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import openai

KEY = "sk-devicemap-test"


class Server:
    """`devicemap serve` in a subprocess on a free port; stderr kept for the test to read."""

    def __init__(self, model: Path, *args: str):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "devicemap", "serve", str(model), "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "DEVICEMAP_API_KEY": ""},
        )  # fmt: skip
        self.lines: list[str] = []
        ready = threading.Event()
        self.port = 0

        def drain() -> None:
            assert self.process.stderr is not None
            for line in self.process.stderr:
                self.lines.append(line)
                if line.startswith("serving ") and " on http://127.0.0.1:" in line:
                    self.port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(120) or not self.port:
            self.stop()
            raise AssertionError("the server did not start:\n" + "".join(self.lines))
        self._client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=KEY)
        self.model_id = str(self._client.models.list().data[0].id)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def client(self, key: str = KEY) -> Any:
        if key == KEY:
            return self._client
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key)

    def http(self, method: str, path: str, body: Any = None, **headers: str) -> tuple[int, Any]:
        """(status, parsed JSON or text) of one raw request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(
            method, path, body=data, headers={"Content-Type": "application/json", **headers}
        )
        response = conn.getresponse()
        raw = response.read().decode()
        conn.close()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, raw

    def health(self) -> dict[str, Any]:
        status, body = self.http("GET", "/health")
        assert status == 200
        return dict(body)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode
