"""The offload cache under hostile and careless use (issue 10): written without following
planted links, private, checked by content, named by its sources' identity, cleaned of
dead writers' files, and crash-consistent under SIGKILL at any point of a write."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from devicemap.cli.cache import app as cache_app
from devicemap.load import cache as cache_module
from test_load import every_block, hand_load, logits, reference
from tiny import make_tiny

BF16 = torch.bfloat16  # the checkpoints are float32: every disk tensor is converted


def on_disk(path: Path, directory: Path) -> Any:
    return hand_load(path, lambda s: every_block(s, "disk"), dtype=BF16, offload_dir=directory)


def caches(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def leftovers(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if ".tmp-" in p.name]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return make_tiny("llama", tmp_path / "llama")


def expected(path: Path) -> torch.Tensor:
    return logits(reference(path, "llama", BF16), "llama")


def test_the_cache_is_private_and_planted_links_are_never_followed(
    model: Path, tmp_path: Path
) -> None:
    directory, victim = tmp_path / "offload", tmp_path / "victim.txt"
    victim.write_text("precious")
    directory.mkdir(mode=0o700)
    name = cache_module.cache_layout(directory, "0" * 64, []).path.name  # the naming scheme
    # a link at the old predictable temp name and at a would-be final name
    (directory / f"{name}.tmp-{os.getpid()}").symlink_to(victim)
    first = on_disk(model, directory)
    (cache,) = caches(directory)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600 and not cache.is_symlink()
    assert victim.read_text() == "precious"
    assert torch.equal(logits(first, "llama"), expected(model))
    # a link planted where the cache is: replaced by a fresh file, its target untouched
    cache.unlink()
    cache.symlink_to(victim)
    on_disk(model, directory)
    assert victim.read_text() == "precious" and not cache.is_symlink() and cache.is_file()


def test_a_fresh_directory_is_private(model: Path, tmp_path: Path) -> None:
    directory = tmp_path / "new" / "offload"
    on_disk(model, directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_flipped_bytes_are_found_by_their_digest_and_converted_again(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "offload"
    on_disk(model, directory)
    (cache,) = caches(directory)
    data = bytearray(cache.read_bytes())
    data[-100] ^= 0xFF  # one byte of the last tensor: same size, same header
    cache.write_bytes(bytes(data))
    monkeypatch.setattr(cache_module, "_verified", set())  # as in a new process
    again = on_disk(model, directory)
    assert torch.equal(logits(again, "llama"), expected(model))
    assert cache.read_bytes()[-100] != data[-100]  # rewritten whole


def test_a_source_rewritten_with_the_same_size_and_mtime_gets_a_new_cache(
    model: Path, tmp_path: Path
) -> None:
    directory = tmp_path / "offload"
    on_disk(model, directory)
    (old,) = caches(directory)
    changed = make_tiny("llama", tmp_path / "other", seed=1)  # same shapes, other weights
    for shard in sorted(model.glob("*.safetensors")):
        st = shard.stat()
        shard.write_bytes((changed / shard.name).read_bytes())  # in place: same inode
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))  # what cp -p / rsync -a keep
        assert shard.stat().st_size == st.st_size
    again = on_disk(model, directory)
    assert torch.equal(logits(again, "llama"), expected(model))
    (new,) = caches(directory)  # the stale one was deleted when the new one was written
    assert new != old


def test_dead_writers_temp_files_are_swept_and_live_ones_kept(model: Path, tmp_path: Path) -> None:
    directory = tmp_path / "offload"
    directory.mkdir()
    dead = _dead_pid()
    partial = directory / f"abc.safetensors.tmp-{dead}-0123456789abcdef"
    partial.write_bytes(b"\0" * 4096)
    live = directory / f"abc.safetensors.tmp-{os.getpid()}-fedcba9876543210"
    live.write_bytes(b"\0" * 10)
    on_disk(model, directory)
    assert not partial.exists() and live.exists()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid  # reaped: no such process (unless reused within the test, very unlikely)


# --- SIGKILL at any point of a write ---------------------------------------------------

_KILLED_WRITER = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, sys.argv[3])
    import torch
    from devicemap.load import cache
    from test_load import every_block, hand_load
    calls = [0]
    write = cache._write_bytes

    def announce(f, data):
        calls[0] += 1
        if str(calls[0]) == sys.argv[4]:
            f.flush()
            print("writing", flush=True)
            time.sleep(60)  # killed here
        write(f, data)

    cache._write_bytes = announce
    if sys.argv[4] == "rename":
        real = os.replace
        def replace(a, b):
            real(a, b)
            print("writing", flush=True)
            time.sleep(60)  # killed after the rename, before the directory's fsync
        os.replace = replace
    hand_load(sys.argv[1], lambda s: every_block(s, "disk"), dtype=torch.bfloat16,
              offload_dir=sys.argv[2])
    print("done", flush=True)
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
@pytest.mark.parametrize("point", ["1", "5", "rename"])
def test_a_load_killed_while_converting_leaves_nothing_the_next_one_uses(
    point: str, model: Path, tmp_path: Path
) -> None:
    directory = tmp_path / "offload"
    tests = str(Path(__file__).parent)
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(model), str(directory), tests, point],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=tests,
    )
    assert child.stdout is not None
    line = child.stdout.readline()  # the child is inside the write (or just past the rename)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert line == b"writing\n"
    again = on_disk(model, directory)
    assert torch.equal(logits(again, "llama"), expected(model))
    assert leftovers(directory) == [] and len(caches(directory)) == 1


# --- devicemap cache ls | rm | prune ---------------------------------------------------


def test_cache_ls_rm_and_prune(model: Path, tmp_path: Path) -> None:
    directory, runner = tmp_path / "offload", CliRunner()
    on_disk(model, directory)
    (cache,) = caches(directory)
    partial = directory / f"x.safetensors.tmp-{_dead_pid()}-00aa"
    partial.write_bytes(b"\0" * 100)
    listed = runner.invoke(cache_app, ["ls", "--dir", str(directory)], env={"COLUMNS": "200"})
    assert listed.exit_code == 0, listed.output
    assert cache.name in listed.output and "partial" in listed.output
    assert str(model) in listed.output and "just now" in listed.output
    pruned = runner.invoke(cache_app, ["prune", "--dir", str(directory)])
    assert pruned.exit_code == 0 and not partial.exists() and cache.exists()
    missing = runner.invoke(cache_app, ["rm", "nothing-like-it", "--dir", str(directory)])
    assert missing.exit_code == 1 and "devicemap cache ls" in missing.output
    removed = runner.invoke(cache_app, ["rm", str(model), "--dir", str(directory)])
    assert removed.exit_code == 0 and not cache.exists()


def test_prune_removes_a_cache_whose_source_is_gone(model: Path, tmp_path: Path) -> None:
    directory = tmp_path / "offload"
    on_disk(model, directory)
    (cache,) = caches(directory)
    time.sleep(0.01)
    for shard in model.glob("*.safetensors"):
        shard.unlink()
    (entry,) = cache_module.entries(directory)
    assert entry.status == "stale"
    assert cache_module.sweep(directory) == [cache] and not cache.exists()
