"""GPU habits on fake machines: the CUDA margin, --gpu-memory-fraction, --gpus N, and Apple
unified memory (mps) counted once, its cpu/disk-stored blocks executing on the CPU.

No GPU is needed: the probes devicemap reads (torch.cuda.is_available / device_count /
mem_get_info, torch.backends.mps.is_available, torch.mps.recommended_max_memory, the RAM
figures of devices.cpu_memory) are monkeypatched."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from devicemap import devices
from devicemap.cli.main import app
from devicemap.devices import (
    CPU,
    DISK,
    GPU_CONTEXT_MARGIN,
    MPS,
    Device,
    Inventory,
    gpu_margin_bytes,
    inventory,
    measure_budgets,
    mps_share,
    resolve_budgets,
    select_gpus,
)
from devicemap.errors import BadOption, BadSize, PlanError, UnknownDevice
from devicemap.plan.planner import make_plan, plan
from test_plan import decoder, opts

GIB, MIB = 2**30, 2**20
GPU0, GPU1, GPU2 = Device("cuda", 0), Device("cuda", 1), Device("cuda", 2)
CONFIGS = Path(__file__).parent / "data" / "configs"
RAM = (64 * GIB, 128 * GIB)  # (free, total) bytes of the fake machine's RAM


# --- fake machines ------------------------------------------------------------------------


def fake_cuda(monkeypatch: pytest.MonkeyPatch, gpus: dict[int, tuple[int, int]]) -> None:
    """A machine with these CUDA GPUs ({index: (free, total)}) and RAM."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=None: gpus[index])
    monkeypatch.setattr(devices, "cpu_memory", lambda **_: RAM)


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> dict[int, tuple[int, int]]:
    """A 24 GiB card with 23.5 GiB free, an 80 GiB one with 70 GiB free."""
    gpus = {0: (int(23.5 * GIB), 24 * GIB), 1: (70 * GIB, 80 * GIB)}
    fake_cuda(monkeypatch, gpus)
    return gpus


def fake_mps(
    monkeypatch: pytest.MonkeyPatch,
    ram: tuple[int, int],
    *,
    recommended: int | None,
    allocated: int = 0,
) -> None:
    """An Apple silicon Mac: no CUDA, mps available, `ram` = (free, total) unified memory."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(devices, "cpu_memory", lambda **_: ram)
    if recommended is None:
        monkeypatch.delattr(torch.mps, "recommended_max_memory", raising=False)
    else:
        monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: recommended, raising=False)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: allocated, raising=False)


def margin(total: int) -> int:
    return 512 * MIB + int(total * 0.05)


# --- the CUDA margin ----------------------------------------------------------------------


def test_the_default_margin_is_512_mib_and_5_percent_of_the_gpu() -> None:
    assert GPU_CONTEXT_MARGIN == 512 * MIB
    assert gpu_margin_bytes(24 * GIB) == 512 * MIB + int(1.2 * GIB)  # 1.7 GiB of a 24 GiB card
    assert gpu_margin_bytes(80 * GIB) == int(4.5 * GIB)
    assert gpu_margin_bytes(24 * GIB, "1GiB") == GIB
    assert gpu_margin_bytes(80 * GIB, "10%") == 8 * GIB  # a percentage of the GPU's memory
    assert gpu_margin_bytes(80 * GIB, 0) == 0


def test_inventory_of_a_fake_two_gpu_machine(two_gpus) -> None:
    inv = inventory()
    assert inv.gpus == [GPU0, GPU1]
    assert inv.free[GPU0] == int(23.5 * GIB) and inv.total[GPU1] == 80 * GIB
    assert (inv.free[CPU], inv.total[CPU]) == RAM and DISK in inv.free


def test_measured_budgets_keep_the_margin_free(two_gpus) -> None:
    measured = measure_budgets(None)
    sizes = measured.sizes
    assert list(sizes) == [GPU0, GPU1, CPU, DISK]
    assert sizes[GPU0] == int(23.5 * GIB) - margin(24 * GIB)
    assert sizes[GPU1] == 70 * GIB - margin(80 * GIB)
    assert sizes[CPU] == RAM[0]  # only CUDA GPUs keep a margin
    assert measured.notes[0] == (
        "cuda:0: 23.50 GiB free now, 1.70 GiB kept free for the CUDA context, kernels and"
        " allocator (--gpu-margin): budget 21.80 GiB"
    )
    assert measured.notes[1].startswith("cuda:1: 70.00 GiB free now, 4.50 GiB kept free")


@pytest.mark.parametrize(
    ("given", "kept"), [("2GiB", 2 * GIB), ("0", 0), (0, 0), ("10%", int(2.4 * GIB))]
)
def test_the_margin_is_overridable(two_gpus, given, kept) -> None:
    measured = measure_budgets(None, gpu_margin=given)
    assert measured.sizes[GPU0] == int(23.5 * GIB) - kept
    assert ("no --gpu-margin kept free" in measured.notes[0]) == (kept == 0)


def test_explicit_sizes_are_taken_as_they_are(two_gpus) -> None:
    measured = measure_budgets({0: "23.5GiB", "cpu": "8GiB"})  # all that is free: the user said so
    assert measured.sizes == {GPU0: int(23.5 * GIB), CPU: 8 * GIB}
    assert measured.notes == ()


def test_a_percentage_keeps_at_least_the_margin(two_gpus) -> None:
    free0 = int(23.5 * GIB)
    low = measure_budgets({0: "85%", "cpu": "8GiB"})  # keeps 3.5 GiB free: more than 1.7
    assert low.sizes[GPU0] == int(free0 * 0.85)
    assert "(85% of it), leaving 3.53 GiB free (at least the 1.70 GiB --gpu-margin)" in low.notes[0]
    high = measure_budgets({0: "99%", "cpu": "8GiB"})
    assert high.sizes[GPU0] == free0 - margin(24 * GIB)
    assert "99% of it would be 23.26 GiB, but 1.70 GiB is kept free" in high.notes[0]
    assert measure_budgets({0: "99%"}, gpu_margin=0).sizes[GPU0] == int(free0 * 0.99)


def test_no_gpu_no_margin_and_what_if_plans_probe_nothing(monkeypatch) -> None:
    def probe(**_: Any) -> Inventory:
        raise AssertionError("a what-if plan must not probe this machine")

    monkeypatch.setattr(devices, "inventory", probe)
    sizes = resolve_budgets({0: "40GiB", 1: "40GiB", "cpu": "64GiB"}, gpu_margin="2GiB")
    assert sizes == {GPU0: 40 * GIB, GPU1: 40 * GIB, CPU: 64 * GIB}


@pytest.mark.parametrize("bad", ["-1GiB", "lots", "150%", True])
def test_a_bad_margin_names_the_option(two_gpus, bad) -> None:
    with pytest.raises(BadSize, match="--gpu-margin"):
        measure_budgets(None, gpu_margin=bad)


# --- --gpu-memory-fraction ----------------------------------------------------------------


def test_the_fraction_budgets_each_gpus_free_memory(two_gpus) -> None:
    measured = measure_budgets(None, gpu_memory_fraction=0.85)
    assert measured.sizes[GPU0] == int(23.5 * GIB * 0.85)
    assert measured.sizes[GPU1] == int(70 * GIB * 0.85)
    assert measured.sizes[CPU] == RAM[0]
    assert (
        "budget 19.97 GiB (--gpu-memory-fraction 0.85), leaving 3.53 GiB free"
        in (measured.notes[0])
    )


def test_a_fraction_past_the_margin_keeps_the_margin(two_gpus) -> None:
    measured = measure_budgets(None, gpu_memory_fraction=1)
    assert measured.sizes[GPU0] == int(23.5 * GIB) - margin(24 * GIB)
    assert (
        "--gpu-memory-fraction 1 would be 23.50 GiB, but 1.70 GiB is kept free"
        in (measured.notes[0])
    )
    assert measure_budgets(None, gpu_memory_fraction=1, gpu_margin=0).sizes[GPU0] == int(23.5 * GIB)


def test_a_per_device_budget_wins_over_the_fraction(two_gpus) -> None:
    """The seed's max_memory: each GPU 85% of its free memory, beside a cpu budget."""
    given = {0: "10GiB", "cpu": "64GiB"}
    sizes = measure_budgets(given, gpu_memory_fraction=0.85).sizes
    assert sizes == {
        GPU0: 10 * GIB,
        GPU1: int(70 * GIB * 0.85),
        CPU: 64 * GIB,
    }  # no disk: not named
    assert list(measure_budgets(given, gpus=1, gpu_memory_fraction=0.85).sizes) == [GPU0, CPU]
    assert list(measure_budgets(given, gpus=[1], gpu_memory_fraction=0.85).sizes) == [GPU1, CPU]


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, math.nan, math.inf, True, "0.85"])
def test_a_bad_fraction_names_the_option_and_the_fix(two_gpus, bad) -> None:
    with pytest.raises(BadOption, match=r"--gpu-memory-fraction .* at most 1, such as 0.85") as e:
        measure_budgets(None, gpu_memory_fraction=bad)
    assert e.value.options == ("gpu_memory_fraction",)


# --- --gpus N: the first N by index -------------------------------------------------------


def test_gpus_n_takes_the_first_n_by_index() -> None:
    free = {GPU2: 30 * GIB, CPU: 64 * GIB, GPU0: 10 * GIB, GPU1: 20 * GIB}  # unsorted on purpose
    inv = Inventory(free=free, total=free)
    assert select_gpus(inv, 2) == [GPU0, GPU1]
    assert select_gpus(inv, 3) == [GPU0, GPU1, GPU2]
    assert select_gpus(inv, 0) == []
    assert select_gpus(inv, None) == [GPU0, GPU1, GPU2]
    with pytest.raises(UnknownDevice, match="negative"):
        select_gpus(inv, -1)  # was [:-1]: every GPU but the last


def test_gpus_n_on_a_fake_three_gpu_machine(monkeypatch) -> None:
    fake_cuda(monkeypatch, {i: ((10 + i) * GIB, 40 * GIB) for i in range(3)})
    sizes = resolve_budgets(None, gpus=2, gpu_margin=0)
    assert sizes == {GPU0: 10 * GIB, GPU1: 11 * GIB, CPU: RAM[0], DISK: sizes[DISK]}
    with pytest.raises(UnknownDevice, match="more GPUs than this machine has"):
        resolve_budgets(None, gpus=4)


# --- plans on the fake two-GPU machine ----------------------------------------------------


def test_plan_explains_the_margin(two_gpus) -> None:
    p = plan(decoder(), context=10)
    assert p.usage(GPU0).budget == int(23.5 * GIB) - margin(24 * GIB)
    assert p.reasons[0].startswith("cuda:0: 23.50 GiB free now, 1.70 GiB kept free")
    assert "kept free for the CUDA context" in p.explain()
    fraction = plan(decoder(), context=10, gpu_memory_fraction=0.5, gpu_margin="1GiB")
    assert fraction.usage(GPU1).budget == 35 * GIB


def test_does_not_fit_says_what_the_margin_kept(two_gpus) -> None:
    from devicemap.errors import DoesNotFit

    with pytest.raises(DoesNotFit) as e:
        plan(str(CONFIGS / "llama-3-70b"), max_memory={"cpu": "1GiB"}, gpu_memory_fraction=1)
    assert "(The budgets keep cuda:0 1.70 GiB, cuda:1 4.50 GiB free for the CUDA context" in (
        str(e.value)
    )
    assert e.value.suggestions and e.value.shortfall > 0  # the planner's advice is kept


def test_what_if_plans_have_no_margin_lines() -> None:
    p = plan(decoder(), max_memory={0: "1GiB", "cpu": "1GiB"}, context=10)
    assert p.usage(GPU0).budget == GIB
    assert not any("--gpu-margin" in line for line in p.reasons)


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "120"})


def test_cli_gpu_options(two_gpus) -> None:
    model = str(CONFIGS / "phi-3-mini-4k")
    result = invoke("plan", model, "--gpu-memory-fraction", "0.5", "--explain")
    assert result.exit_code == 0, result.output
    assert "cuda:0: 23.50 GiB free now, budget 11.75 GiB (--gpu-memory-fraction 0.5)" in (
        result.stdout
    )
    result = invoke("plan", model, "--gpu-margin", "3GiB", "--gpus", "1", "--explain")
    assert result.exit_code == 0, result.output
    assert "cuda:0: 23.50 GiB free now, 3.00 GiB kept free" in result.stdout
    assert "cuda:1" not in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpu-memory-fraction", "1.5"], "--gpu-memory-fraction 1.5 is not a fraction"),
        (["--gpu-memory-fraction", "0"], "give a number above 0 and at most 1"),
        (["--gpu-margin", "-2GiB"], "--gpu-margin: memory size '-2GiB'"),
    ],
)
def test_cli_bad_gpu_options_are_one_error_line(two_gpus, args, message) -> None:
    result = invoke("plan", str(CONFIGS / "phi-3-mini-4k"), *args)
    assert result.exit_code == 1 and message in result.output
    assert result.output.count("error:") == 1


# --- Apple unified memory -----------------------------------------------------------------


def test_mps_and_cpu_share_the_free_ram_once(monkeypatch) -> None:
    fake_mps(monkeypatch, (40 * GIB, 64 * GIB), recommended=48 * GIB, allocated=2 * GIB)
    inv = inventory()
    assert inv.gpus == [MPS]
    assert inv.free[MPS] == 40 * GIB  # 46 GiB of room under Metal's limit, but 40 free
    assert inv.free[CPU] == 0
    fake_mps(monkeypatch, (60 * GIB, 64 * GIB), recommended=48 * GIB, allocated=2 * GIB)
    inv = inventory()
    assert inv.free[MPS] == 46 * GIB and inv.free[CPU] == 14 * GIB
    assert inv.free[MPS] + inv.free[CPU] == 60 * GIB  # never more than the free RAM
    assert (inv.total[MPS], inv.total[CPU]) == (48 * GIB, 16 * GIB)
    assert "Metal's recommended working set" in inv.notes[0]


@pytest.mark.parametrize(
    ("total", "share"), [(16 * GIB, 16 * GIB * 2 // 3), (36 * GIB, 24 * GIB), (64 * GIB, 48 * GIB)]
)
def test_without_metals_figure_mps_gets_macos_default_share(monkeypatch, total, share) -> None:
    monkeypatch.delattr(torch.mps, "recommended_max_memory", raising=False)
    assert mps_share(total)[0] == share


def test_a_failing_metal_probe_falls_back(monkeypatch) -> None:
    def broken() -> int:
        raise RuntimeError("MPS backend is not available")

    monkeypatch.setattr(torch.mps, "recommended_max_memory", broken, raising=False)
    assert mps_share(128 * GIB) == (
        96 * GIB,
        "3/4 of the RAM, macOS's default GPU wired-memory limit",
    )


def test_mps_budgets_without_max_memory(monkeypatch) -> None:
    fake_mps(monkeypatch, (30 * GIB, 32 * GIB), recommended=None)
    measured = measure_budgets(None)
    sizes = measured.sizes
    assert list(sizes) == [MPS, CPU, DISK]
    assert sizes[MPS] == 32 * GIB * 2 // 3 and sizes[MPS] + sizes[CPU] == 30 * GIB
    assert measured.notes == inventory().notes
    assert "mps and cpu share it: counted once" in measured.notes[0]
    assert measure_budgets({"mps": "4GiB", "cpu": "4GiB"}).notes == ()  # the user's sizes
    fraction = measure_budgets(None, gpu_memory_fraction=0.5).sizes
    assert fraction[MPS] == sizes[MPS] // 2  # no CUDA margin on mps


def blocks_run_where(p: Any) -> dict[str, tuple[Any, Any]]:
    return {name: (p.device_map[name], p.exec_map[name]) for name in p.device_map}


def test_an_mps_plan_runs_cpu_and_disk_blocks_on_the_cpu() -> None:
    p = make_plan(decoder(), {MPS: 250, CPU: 260, DISK: 1000}, opts())
    where = blocks_run_where(p)
    assert {stored for stored, _ in where.values()} == {"mps", "cpu", "disk"}
    for stored, runs in where.values():
        assert runs == ("mps" if stored == "mps" else "cpu")
    assert p.options.offload_exec == "cpu"
    assert p.usage(MPS).staging == 0  # nothing is streamed to mps
    assert any("execute on cpu, not mps" in line for line in p.reasons)
    cuda = make_plan(decoder(), {GPU0: 500, CPU: 260, DISK: 1000}, opts())
    assert all(runs == 0 for _, runs in blocks_run_where(cuda).values())  # CUDA streams them


def test_an_mps_plan_that_fits_has_no_offload_line() -> None:
    p = make_plan(decoder(), {MPS: 10_000, CPU: 1000}, opts())
    assert set(p.device_map.values()) == {"mps"}
    assert not any("not mps" in line for line in p.reasons)


def test_mps_with_disk_and_no_cpu_budget_asks_for_one() -> None:
    with pytest.raises(PlanError, match=r"stored on disk.*add --max-memory cpu=SIZE"):
        make_plan(decoder(), {MPS: 500, DISK: 1000}, opts())
    with pytest.raises(PlanError, match=r"does not fit on mps alone.*--max-memory cpu=SIZE"):
        make_plan(decoder(), {MPS: 50, DISK: 1000}, opts())
    p = make_plan(decoder(), {MPS: 10_000, DISK: 1000}, opts())  # all on mps: disk unused
    assert set(p.device_map.values()) == {"mps"}


def test_cli_what_if_mps_plan() -> None:
    result = invoke(
        "plan", str(CONFIGS / "phi-3-mini-4k"), "--max-memory", "mps=8GiB", "--max-memory",
        "cpu=8GiB", "--explain",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.stdout.splitlines() if line.strip()]
    runs = {row[0]: row[-1] for row in rows if row[0] in ("mps", "cpu") and len(row) >= 3}
    assert runs == {"mps": "mps", "cpu": "cpu"}  # the block rows: where each device's run
    assert "blocks stored on cpu or disk execute on cpu, not mps" in result.stdout
    result = invoke(
        "plan", str(CONFIGS / "llama-3-70b"), "--max-memory", "mps=8GiB", "--max-memory",
        "cpu=8GiB", "--max-memory", "disk=200GiB", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = json.loads(result.stdout)
    for name, stored in saved["device_map"].items():
        assert saved["exec_map"][name] == ("mps" if stored == "mps" else "cpu"), name


def test_cpu_and_mps_budgets_past_the_unified_ram_warn(monkeypatch) -> None:
    from devicemap.plan.planner import MemoryWarning

    fake_mps(monkeypatch, (12 * GIB, 16 * GIB), recommended=10 * GIB)
    budgets = {"mps": "8GiB", "cpu": "8GiB", "disk": "1GiB"}
    with pytest.warns(MemoryWarning, match=r"the mps and cpu budgets, one RAM, total 16\.00 GiB"):
        plan(decoder(), max_memory=budgets, context=10)


# --- dispatching an mps plan --------------------------------------------------------------


def mps_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """mps tensors live on the CPU here (this machine has no mps): the plan is unchanged."""
    real = Device.torch
    monkeypatch.setattr(
        Device, "torch", lambda d: torch.device("cpu") if d.kind == "mps" else real(d)
    )


def test_dispatch_of_an_mps_plan_streams_nothing_and_matches_the_model(monkeypatch, tmp_path):
    """The planner's mps plan, dispatched with mps played by the CPU (Device.torch maps it
    there): blocks stored on cpu run in place, disk ones are paged, nothing is streamed, and
    the logits are the plain model's."""
    from devicemap.model.skeleton import build_skeleton
    from devicemap.run.dispatch import _STATE, dispatch, release
    from devicemap.run.offload import GpuStreamer, PagePrefetcher
    from test_dispatch import place
    from tiny import build_tiny, make_tiny

    sk = build_skeleton(make_tiny("llama", tmp_path / "model"))
    pins = {"model.layers.1": "cpu", "model.layers.2": "disk", "lm_head": "cpu"}
    p = plan(sk, max_memory={"mps": "1GiB", "cpu": "1GiB", "disk": "1GiB"}, pins=pins, context=16)
    assert {p.exec_map[name] for name in pins} == {"cpu"}
    assert p.exec_map["model.embed_tokens"] == "mps"
    mps_on_the_cpu(monkeypatch)
    plain, model = build_tiny("llama"), place(build_tiny("llama"), p, tmp_path)
    ids = torch.tensor([[1, 5, 17, 42, 99, 7, 3, 250]])
    with torch.no_grad():
        want = plain(input_ids=ids).logits
        dispatch(model, p)
        offloads = model.__dict__[_STATE].offloads
        assert offloads and all(isinstance(o, PagePrefetcher) for o in offloads)
        assert not any(isinstance(o, GpuStreamer) for o in offloads)
        got = model(input_ids=ids).logits
    release(model)
    assert torch.equal(got, want)


def test_dispatch_refuses_a_plan_that_runs_cpu_blocks_on_mps(monkeypatch, tmp_path):
    """A plan file from before (cpu-stored blocks "run on mps"): one error naming the fix."""
    from devicemap.run.dispatch import dispatch
    from test_dispatch import blocks_of, place
    from test_dispatch import make_plan as plan_of
    from tiny import build_tiny

    model = build_tiny("llama")
    storage = dict.fromkeys(blocks_of("llama", model), "mps")
    storage["model.layers.1"] = "cpu"
    p = plan_of(storage, dict.fromkeys(storage, "mps"))
    mps_on_the_cpu(monkeypatch)
    place(model, p, tmp_path)
    with pytest.raises(PlanError, match=r"'model.layers.1' is stored on cpu but executes on mps"):
        dispatch(model, p)


def test_the_expert_cache_is_cuda_only(monkeypatch) -> None:
    from devicemap.run import dispatch as dispatch_module

    installed: list[Any] = []
    monkeypatch.setattr(dispatch_module, "is_experts", lambda module: module.kind == "experts")
    monkeypatch.setattr(
        dispatch_module.expert_cache, "install", lambda *args: installed.append(args[1])
    )

    class Unit(torch.nn.Module):
        def __init__(self, kind: str) -> None:
            super().__init__()
            self.kind = kind

    order = ("attn", "experts")
    for gpu, expected in (("mps", []), ("cuda:0", [torch.device("cuda:0")])):
        installed.clear()
        lay = dispatch_module.Layout(
            order=order,
            storage={"attn": devices.parse_device(gpu), "experts": CPU},
            execution={"attn": devices.parse_device(gpu), "experts": CPU},
            expert_cache=4,
        )
        dispatch_module._expert_caches({"attn": Unit("attn"), "experts": Unit("experts")}, lay)
        assert installed == expected
