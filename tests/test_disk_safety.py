"""A checkpoint changed under a running model whose weights are pages of it (issue 10):
rewritten or truncated in place -> CheckpointChanged at the next forward, before a wrong
answer or a SIGBUS; replaced by a rename -> the model keeps its own weights. Writes into
disk-tier weights stay private: the file never changes, nothing crashes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import devicemap
from devicemap.errors import CheckpointChanged
from test_load import every_block, hand_load, logits, reference
from tiny import make_tiny


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return make_tiny("llama", tmp_path / "llama")


def on_disk(path: Path, tmp_path: Path) -> Any:
    """Every block on disk in the checkpoint's dtype: the weights are its own pages."""
    return hand_load(path, lambda s: every_block(s, "disk"), offload_dir=tmp_path / "offload")


def shards(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def test_a_shard_rewritten_in_place_stops_the_next_forward(model: Path, tmp_path: Path) -> None:
    loaded = on_disk(model, tmp_path)
    expected = logits(reference(model, "llama"), "llama")
    assert torch.equal(logits(loaded, "llama"), expected)
    other = make_tiny("llama", tmp_path / "other", seed=1)
    shard = shards(model)[-1]
    st = shard.stat()
    shard.write_bytes((other / shard.name).read_bytes())  # same inode, same size
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))  # and its mtime kept (cp -p)
    with pytest.raises(CheckpointChanged, match=rf"{shard.name} was changed in place"):
        logits(loaded, "llama")
    devicemap.release(loaded)


def test_a_truncated_shard_is_an_error_not_a_sigbus(model: Path, tmp_path: Path) -> None:
    loaded = on_disk(model, tmp_path)
    shard = shards(model)[-1]
    with open(shard, "r+b") as f:  # what `cp new old` does first
        f.truncate(100)
    with pytest.raises(CheckpointChanged, match=r"truncated .* -> 100 bytes.*Load the model again"):
        logits(loaded, "llama")
    devicemap.release(loaded)


def test_a_shard_replaced_by_a_rename_leaves_the_model_whole(model: Path, tmp_path: Path) -> None:
    loaded = on_disk(model, tmp_path)
    expected = logits(reference(model, "llama"), "llama")
    other = make_tiny("llama", tmp_path / "other", seed=1)
    for shard in shards(model):
        new = shard.with_name(shard.name + ".new")
        new.write_bytes((other / shard.name).read_bytes())
        new.rename(shard)  # the safe way to update a file in use
    assert torch.equal(logits(loaded, "llama"), expected)  # its own (old) pages
    devicemap.release(loaded)


def test_writing_into_a_disk_tier_weight_keeps_the_file(model: Path, tmp_path: Path) -> None:
    before = {p.name: p.read_bytes() for p in shards(model)}
    loaded = on_disk(model, tmp_path)
    with torch.no_grad():
        loaded.model.layers[0].mlp.down_proj.weight.mul_(2)  # RWKV-style in-place rescaling
    logits(loaded, "llama")  # no SIGSEGV, and the file check passes: the file is unchanged
    assert {p.name: p.read_bytes() for p in shards(model)} == before
    devicemap.release(loaded)


_TRUNCATED_MID_FORWARD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[2])
    from pathlib import Path
    import torch
    from test_load import every_block, hand_load
    model = hand_load(Path(sys.argv[1]), lambda s: every_block(s, "disk"),
                      offload_dir=sys.argv[3])
    shard = sorted(Path(sys.argv[1]).glob("*.safetensors"))[-1]
    layer = model.model.layers[-1]

    def cut(*_):  # after the forward's file check, before its last layer reads its pages
        with open(shard, "r+b") as f:
            f.truncate(0)
        import os
        os.posix_fadvise(os.open(shard, os.O_RDONLY), 0, 0, os.POSIX_FADV_DONTNEED)

    layer.register_forward_pre_hook(cut)
    model(torch.tensor([[1, 2, 3]]))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGBUS on a cut mapping")
def test_a_shard_cut_mid_forward_dies_with_a_report_not_silently(
    model: Path, tmp_path: Path
) -> None:
    tests = str(Path(__file__).parent)
    done = subprocess.run(
        [sys.executable, "-c", _TRUNCATED_MID_FORWARD, str(model), tests, str(tmp_path / "o")],
        capture_output=True, text=True, cwd=tests, timeout=120,
    )  # fmt: skip
    if done.returncode == 0:
        pytest.skip("the cut pages were still cached privately: no fault to report")
    assert "Bus error" in done.stderr and "File " in done.stderr, done.stderr[-2000:]


_SMALL_ADDRESS_SPACE = textwrap.dedent(
    """
    import resource, sys
    sys.path.insert(0, sys.argv[2])
    from pathlib import Path
    import devicemap
    from devicemap.errors import DeviceOutOfMemory
    from test_load import every_block, hand_load
    def load():
        return hand_load(Path(sys.argv[1]), lambda s: every_block(s, "disk"),
                         offload_dir=sys.argv[3])

    devicemap.release(load())  # everything imported, thread stacks made and freed
    used = sum(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize"))
    limit = used * 1024 + (24 << 20)  # 24 MiB more than it has now: not the 70 MB of maps
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        load()
    except DeviceOutOfMemory as error:
        print("DeviceOutOfMemory:", error)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS")
def test_an_address_space_limit_is_device_out_of_memory(tmp_path: Path) -> None:
    big = make_tiny("llama", tmp_path / "big", hidden_size=512, intermediate_size=2048)
    tests = str(Path(__file__).parent)
    done = subprocess.run(
        [sys.executable, "-c", _SMALL_ADDRESS_SPACE, str(big), tests, str(tmp_path / "o")],
        capture_output=True, text=True, cwd=tests, timeout=120,
    )  # fmt: skip
    assert "DeviceOutOfMemory: cpu:" in done.stdout, done.stderr[-3000:]
    assert "ulimit -v" in done.stdout
