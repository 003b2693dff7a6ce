"""Start-up time of the command line: `devicemap --help`, next to `import torch`.

Each run is a fresh process (the console script, or `python -m devicemap` without one),
timed from start to exit; commands alternate, after one untimed warm-up each so the page
cache is warm for all of them. `import torch` is the reference: what every command paid
before the CLI imported torch, transformers and the rest only in the commands that use
them. `python -c pass` is the interpreter's own start-up, below which nothing can go.
Target (issue 13): `devicemap --help` under 1 s, and none of torch, transformers,
safetensors, PIL, fastapi or uvicorn imported by `import devicemap.cli.main`.

    python bench/startup.py              # 7 runs each, the median reported
    python bench/startup.py --runs 15
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from report import median, write

HEAVY = ("torch", "transformers", "safetensors", "PIL", "fastapi", "uvicorn")
TARGET_S = 1.0  # `devicemap --help`


def devicemap_script() -> list[str]:
    """The `devicemap` console script beside this Python, else `python -m devicemap`."""
    script = Path(sys.executable).parent / "devicemap"
    if script.is_file():
        return [str(script)]
    found = shutil.which("devicemap")
    return [found] if found else [sys.executable, "-m", "devicemap"]


def commands() -> dict[str, list[str]]:
    return {
        "devicemap --help": [*devicemap_script(), "--help"],
        "devicemap plan --help": [*devicemap_script(), "plan", "--help"],
        "import devicemap.cli.main": [sys.executable, "-c", "import devicemap.cli.main"],
        "import torch": [sys.executable, "-c", "import torch"],
        "python -c pass": [sys.executable, "-c", "pass"],
    }


def timed(argv: list[str]) -> float:
    """Seconds for one fresh process to start, run and exit (status 0, output discarded)."""
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def heavy_imports() -> list[str]:
    """Which of HEAVY a fresh `import devicemap.cli.main` leaves in sys.modules."""
    script = (
        "import json, sys, devicemap.cli.main; "
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="fresh processes per command")
    args = parser.parse_args()

    todo = commands()
    for argv in todo.values():  # warm-up, untimed: the page cache holds every file after it
        timed(argv)
    times: dict[str, list[float]] = {name: [] for name in todo}
    for _ in range(args.runs):  # alternate, so drift hits every command alike
        for name, argv in todo.items():
            times[name].append(timed(argv))

    rows = [
        {
            "command": name,
            "median_s": median(seconds),
            "min_s": min(seconds),
            "max_s": max(seconds),
            "runs": len(seconds),
        }
        for name, seconds in times.items()
    ]
    loaded = heavy_imports()
    help_s = median(times["devicemap --help"])
    notes = {
        "runs": f"{args.runs} fresh processes per command, alternating, after one untimed"
        " warm-up each (page cache warm)",
        "script": " ".join(Path(a).name for a in devicemap_script()),
        "heavy_modules_after_import_cli": loaded,
        "target": f"devicemap --help under {TARGET_S} s; no {', '.join(HEAVY)} at start-up",
        "met": bool(help_s < TARGET_S and not loaded),
    }
    write("startup", rows, notes=notes)
    print(
        f"target met: {notes['met']} (devicemap --help {help_s:.2f} s, median of {args.runs};"
        f" heavy modules at start-up: {', '.join(loaded) or 'none'})"
    )


if __name__ == "__main__":
    main()
