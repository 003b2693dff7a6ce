from pathlib import Path

import pytest
import torch

from devicemap.devices import (
    CPU,
    DISK,
    Device,
    Inventory,
    format_size,
    parse_device,
    parse_devices,
    parse_size,
    resolve_budgets,
    select_gpus,
)
from devicemap.errors import BadSize, DuplicateDevice, UnknownDevice


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, Device("cuda", 0)),
        (3, Device("cuda", 3)),
        ("1", Device("cuda", 1)),
        ("cuda", Device("cuda", 0)),
        ("cuda:2", Device("cuda", 2)),
        ("CPU", CPU),
        ("disk", DISK),
        ("mps", Device("mps")),
        (torch.device("cuda", 1), Device("cuda", 1)),
        (torch.device("cpu"), CPU),
    ],
)
def test_parse_device(value, expected):
    assert parse_device(value) == expected


def test_device_map_value_and_str():
    assert Device("cuda", 1).map_value == 1
    assert CPU.map_value == "cpu"
    assert str(Device("cuda", 1)) == "cuda:1"
    assert DISK.torch() == torch.device("cpu")


@pytest.mark.parametrize("value", ["gpu0", "cuda:x", "tpu", "meta", -1, 1.5, True, ""])
def test_unknown_device(value):
    with pytest.raises(UnknownDevice, match="device"):
        parse_device(value)


def test_duplicate_device_names_both_spellings():
    with pytest.raises(DuplicateDevice, match=r"'cuda:0'.*0|0.*'cuda:0'"):
        parse_devices([0, "cpu", "cuda:0"])


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1024, 1024),
        ("1024", 1024),
        ("16GiB", 16 * 2**30),
        ("16 GiB", 16 * 2**30),
        ("16GB", 16 * 10**9),
        ("1.5gb", 1_500_000_000),
        ("512MiB", 512 * 2**20),
        ("0", 0),
    ],
)
def test_parse_size(value, expected):
    assert parse_size(value) == expected


def test_parse_percentage_of_free():
    assert parse_size("85%", free=1000) == 850
    with pytest.raises(BadSize, match="unknown"):
        parse_size("50%")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10 GiBs", "unknown unit 'GiBs'"),
        ("-1GB", "not understood"),
        ("150%", "at most 100"),
        ("0%", "above 0"),
        ("GiB", "not understood"),
        (-5, "negative"),
        ("ten", "not understood"),
    ],
)
def test_bad_sizes(value, message):
    with pytest.raises(BadSize, match=message):
        parse_size(value, free=100)


def test_format_size():
    assert format_size(1536 * 2**20) == "1.50 GiB"
    assert format_size(100) == "100 B"
    assert format_size(-(2**31)) == "-2.00 GiB"


def _inv() -> Inventory:
    free = {
        Device("cuda", 0): 10 * 2**30,
        Device("cuda", 1): 20 * 2**30,
        CPU: 64 * 2**30,
        DISK: 2**40,
    }
    return Inventory(free=free, total=free)


def test_budgets_what_if_for_absent_devices_sorted():
    budgets = resolve_budgets({"cpu": "64GiB", 1: "40GiB", "cuda:0": "40GiB"})
    assert list(budgets) == [Device("cuda", 0), Device("cuda", 1), CPU]
    assert budgets[Device("cuda", 1)] == 40 * 2**30


def test_budgets_percent_uses_inventory():
    budgets = resolve_budgets({0: "50%", "cpu": "1GiB"}, inv=_inv())
    assert budgets[Device("cuda", 0)] == 5 * 2**30


def test_budgets_default_from_inventory():
    budgets = resolve_budgets(None, inv=_inv(), gpus=[1])
    kept = 512 * 2**20 + 2**30  # the CUDA margin: 512 MiB + 5% of the 20 GiB card
    assert budgets == {Device("cuda", 1): 20 * 2**30 - kept, CPU: 64 * 2**30, DISK: 2**40}
    budgets = resolve_budgets(None, inv=_inv(), gpus=[1], gpu_margin=0)
    assert budgets == {Device("cuda", 1): 20 * 2**30, CPU: 64 * 2**30, DISK: 2**40}


def test_select_gpus_errors():
    assert select_gpus(_inv(), 1) == [Device("cuda", 0)]
    with pytest.raises(UnknownDevice, match="more GPUs"):
        select_gpus(_inv(), 3)
    with pytest.raises(UnknownDevice, match="cuda:5 not found in this machine"):
        select_gpus(_inv(), [5])


def test_budgets_gpus_selects_among_budgeted():
    mm = {0: "10GiB", 1: "20GiB", "cpu": "64GiB"}
    assert list(resolve_budgets(mm, gpus=[1])) == [Device("cuda", 1), CPU]
    assert list(resolve_budgets(mm, gpus=1)) == [Device("cuda", 0), CPU]
    with pytest.raises(UnknownDevice, match="cuda:3 not found in --max-memory"):
        resolve_budgets(mm, gpus=[3])


# --- absurd sizes -------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("9" * 400, "'999999999999...9999999999999'"),  # float: inf; int(inf) overflowed
        ("9" * 400 + "GiB", "'999999999999...9999999999GiB'"),
        ("9" * 100_000 + ".5 TB", "'999999999999...99999999.5 TB'"),
        ("1" + "0" * 20, "'100000000000000000000'"),  # 10**20 bytes: over 16 EiB, a typo
        ("20000000TiB", "'20000000TiB'"),
        (2**64 + 1, "18446744073709551617"),
        (10**400, "100000000000000000...0000000000000000000"),
        (10**100_000, "<an integer of 332193 bits>"),  # str() of it refuses: > 4300 digits
    ],
    ids=[
        "400 digits",
        "GiB",
        "100k digits",
        "1e20",
        "TiB",
        "int 2**64+1",
        "int 1e400",
        "int 1e100000",
    ],
)
def test_absurd_sizes_are_bad_sizes(value, shown):
    with pytest.raises(BadSize, match="more than 16 EiB") as e:
        parse_size(value)
    assert f"memory size {shown} is more than 16 EiB" in str(e.value) and len(str(e.value)) < 200


def test_sizes_up_to_16_eib_are_fine():
    assert parse_size(2**64) == 2**64 and parse_size("16384TiB") == 2**54


@pytest.mark.parametrize(
    "value", ["9" * 400 + "%", "x" * 10**6, "1" * 10**6 + "XB"], ids=["percent", "text", "unit"]
)
def test_long_bad_sizes_give_short_messages(value):
    with pytest.raises(BadSize) as e:
        parse_size(value, free=100)
    assert len(str(e.value)) < 200


@pytest.mark.parametrize(
    "value", ["cuda:" + "9" * 5000, "x" * 10**6, "9" * 5000], ids=["cuda:N", "text", "index"]
)
def test_long_bad_devices_give_short_messages(value):
    with pytest.raises(UnknownDevice) as e:  # int() of 5000 digits was a ValueError
        parse_device(value)
    assert len(str(e.value)) < 200


def test_budgets_with_absurd_sizes():
    with pytest.raises(BadSize, match="more than 16 EiB"):
        resolve_budgets({"cpu": 10**5000})  # str() of the int was a ValueError
    with pytest.raises(BadSize, match=r"'9999.*9999' is more than 16 EiB"):
        resolve_budgets({"cpu": "9" * 400})


def test_cli_absurd_max_memory():
    from typer.testing import CliRunner

    from devicemap.cli.main import app

    config = str(Path(__file__).parent / "data" / "configs" / "llama-3-70b")
    result = CliRunner().invoke(app, ["plan", config, "--max-memory", "cpu=" + "9" * 400])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "more than 16 EiB" in result.output and "'99999" in result.output
    assert len(result.output) < 400
