"""Launch N local ranks the way torchrun does (RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1,
MASTER_PORT), each with its own stdout and stderr, so tests can read every rank's output,
kill or stop one, and time how long the others take to fail."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Result:
    rank: int
    returncode: int
    stdout: str
    stderr: str


class Ranks:
    """`size` processes running `argv(rank)`; always cleaned up by `close` (a context)."""

    def __init__(
        self,
        argv: list[list[str]],
        directory: Path,
        *,
        timeout: float = 30,
        env=None,
        stdin: bytes | None = None,
    ):
        """`stdin`: what rank 0 reads (the others read nothing, as under torchrun)."""
        self.directory = directory
        port = free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        size = len(argv)
        for rank, args in enumerate(argv):
            environ = {
                **os.environ,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(size),
                "LOCAL_WORLD_SIZE": str(size),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1",
                "DEVICEMAP_RANK_TIMEOUT": str(timeout),
                "PYTHONUNBUFFERED": "1",
                **(env or {}),
            }
            out = open(directory / f"stdout.{rank}", "wb")  # noqa: SIM115 - closed in close()
            err = open(directory / f"stderr.{rank}", "wb")  # noqa: SIM115
            source: Any = subprocess.DEVNULL
            if rank == 0 and stdin is not None:
                (directory / "stdin").write_bytes(stdin)
                source = open(directory / "stdin", "rb")  # noqa: SIM115
            self.procs.append(
                subprocess.Popen(args, stdout=out, stderr=err, env=environ, stdin=source)
            )
            out.close()
            err.close()

    def __enter__(self) -> Ranks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stderr(self, rank: int) -> str:
        return (self.directory / f"stderr.{rank}").read_text(errors="replace")

    def wait_for(self, rank: int, text: str, timeout: float = 120) -> None:
        """Until rank `rank` writes `text` on stderr (AssertionError after `timeout` s)."""
        end = time.monotonic() + timeout
        while text not in self.stderr(rank):
            if time.monotonic() > end or self.procs[rank].poll() is not None:
                raise AssertionError(f"rank {rank} never wrote {text!r}:\n{self.stderr(rank)}")
            time.sleep(0.05)

    def signal(self, rank: int, sig: int) -> None:
        self.procs[rank].send_signal(sig)

    def wait(self, timeout: float = 180) -> list[Result]:
        """Every rank's result; AssertionError (after killing all) if one outlives `timeout`."""
        end = time.monotonic() + timeout
        for rank, proc in enumerate(self.procs):
            try:
                proc.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.close()
                raise AssertionError(f"rank {rank} still running after {timeout} s") from None
        return [self.result(r) for r in range(len(self.procs))]

    def result(self, rank: int) -> Result:
        proc = self.procs[rank]
        code = proc.returncode if proc.returncode is not None else -999
        stdout = (self.directory / f"stdout.{rank}").read_text(errors="replace")
        return Result(rank, code, stdout, self.stderr(rank))

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait()


def launch(argv: list[list[str]], directory: Path, **kwargs) -> list[Result]:
    """Run the ranks to the end."""
    with Ranks(argv, directory, **kwargs) as ranks:
        return ranks.wait()
