"""Helpers shared by the benchmark scripts: machine description, medians, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def machine_info() -> dict[str, Any]:
    """CPU model, core count, memory and load at the time of the run (the machine is shared)."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    import torch

    return {
        "cpu_model": cpu,
        "nproc": os.cpu_count(),
        "mem_total_gib": round(mem_kb / 2**20, 1),
        "loadavg_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        return "unknown"


def command_line() -> str:
    """How this script was invoked (interpreter name and arguments), for the results JSON."""
    return " ".join([Path(sys.executable).name, *sys.argv])


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    """Write the results JSON (parent folders created) and say where it went."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    print(f"wrote {out}")
