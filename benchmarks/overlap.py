"""Wall-clock gain of off-policy pipelining (``rollout.max_staleness`` 1 vs 0) on the tiny AGAPO recipe.

Each run is one ``kexaone-align run recipes/tiny/agapo.yaml ...`` in a fresh child process (its own
local Ray), with explicit overrides so the numbers keep their meaning if the recipe is retuned. Arms
run interleaved (A B C A B C ...) so slow phases of the shared machine hit every arm alike. The
per-step time is read from ``metrics.jsonl`` (the ``time`` stamp of every training-step row):
``(t[last] - t[warmup]) / (steps - warmup)``, which leaves out start-up, the evaluations before and
after, the first ``--warmup`` steps and the export. The ratio reported is sync / overlap per-step
time (> 1: overlap is faster).

Arms (``--arms``): ``sync`` (max_staleness 0) and ``overlap`` (max_staleness 1), both with
``cluster.cpus_per_actor=1`` (Ray gives every actor one torch thread, so the learner and the rollout
worker can each run on one of the two cores at once), and ``sync_2cpu`` (max_staleness 0,
``cpus_per_actor=2``: each phase gets both cores while it runs, the fair synchronous baseline).

The tiny model starts random, so every math reward is 0; ``agapo.zero_variance_filter=false`` keeps
every group in the batch, so every step takes a real learner step (a zero-variance step would skip
it and there would be nothing to overlap).

    python benchmarks/overlap.py --out benchmarks/results/overlap.json
    python benchmarks/overlap.py --quick --out /tmp/overlap_quick.json   # ~1 min smoke version
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine_info, median, write_json

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/tiny/agapo.yaml"

# Pinned so the measurement keeps its meaning when the recipe's training settings are retuned.
COMMON = {
    "agapo.steps": 8,
    "agapo.prompts_per_step": 16,
    "agapo.group_size": 8,
    "agapo.zero_variance_filter": "false",
    "agapo.eval_every_steps": 0,
    "rollout.num_workers": 1,
    "rollout.max_new_tokens": 64,
    "rollout.batch_size": 128,
    "learners.num_learners": 1,
    "learners.zero_stage": 2,
    "data.num_eval": 8,
    "checkpoint.every_steps": 0,
    "checkpoint.export": "false",
    "logging.plots": "false",
    "logging.save_rollouts": "false",
    "logging.progress_bar": "false",
    "logging.tensorboard": "false",
}
QUICK = {
    "agapo.steps": 4,
    "agapo.prompts_per_step": 4,
    "agapo.group_size": 4,
    "rollout.max_new_tokens": 16,
    "rollout.batch_size": 16,
    "data.num_eval": 2,
}
ARMS = {
    "sync": {"rollout.max_staleness": 0, "cluster.cpus_per_actor": 1},
    "overlap": {"rollout.max_staleness": 1, "cluster.cpus_per_actor": 1},
    "sync_2cpu": {"rollout.max_staleness": 0, "cluster.cpus_per_actor": 2},
}


def step_rows(metrics_path: Path) -> list[dict]:
    """The AGAPO training-step rows of a run's metrics.jsonl (evaluation rows left out), by step."""
    rows = []
    for line in metrics_path.read_text().splitlines():
        row = json.loads(line)
        if row.get("stage") == "agapo" and "policy_version" in row:
            rows.append(row)
    return sorted(rows, key=lambda r: r["step"])


def steady_seconds_per_step(rows: list[dict], warmup: int) -> float:
    """Mean wall seconds per step after the first ``warmup`` steps, from the rows' time stamps."""
    if len(rows) <= warmup or warmup < 1:
        raise ValueError(f"need more than warmup={warmup} (>= 1) step rows, got {len(rows)}")
    return (rows[-1]["time"] - rows[warmup - 1]["time"]) / (len(rows) - warmup)


def run_once(arm: str, overrides: dict, workdir: Path, timeout_s: float) -> dict:
    """One child ``kexaone-align run``; returns its per-step numbers (raises if it failed)."""
    run_dir = workdir / f"{arm}-{time.monotonic_ns()}"
    args = [f"{k}={v}" for k, v in {**overrides, "run_dir": str(run_dir)}.items()]
    cmd = [sys.executable, "-m", "kexaone_align", "run", RECIPE, *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{arm} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = step_rows(run_dir / "metrics.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"rows": rows, "summary": summary, "process_wall_seconds": wall}


def describe_run(arm: str, result: dict, warmup: int) -> dict:
    rows = result["rows"]
    times = [r["time"] for r in rows]

    def med(key: str) -> float | None:
        vals = [r[key] for r in rows[warmup:] if isinstance(r.get(key), int | float)]
        return median(vals) if vals else None

    return {
        "arm": arm,
        "seconds_per_step": steady_seconds_per_step(rows, warmup),
        "step_intervals_s": [b - a for a, b in itertools.pairwise(times)],
        "steps": len(rows),
        "skipped_steps": result["summary"].get("skipped_steps"),
        "dropped_stale": result["summary"].get("dropped_stale"),
        "staleness_median": med("staleness"),
        "rollout_seconds_median": med("rollout/seconds"),
        "learner_step_seconds_median": med("step_time_s"),
        "stage_wall_seconds": result["summary"].get("wall_seconds"),
        "process_wall_seconds": result["process_wall_seconds"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/overlap.json")
    ap.add_argument("--arms", default="sync,overlap,sync_2cpu", help=f"comma list of {', '.join(ARMS)}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out at the start of each run")
    ap.add_argument("--quick", action="store_true", help="4 tiny steps, 1 repeat, sync and overlap only")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per child run")
    args = ap.parse_args()
    t0 = time.perf_counter()
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        ap.error(f"unknown arm(s) {unknown}; known: {', '.join(ARMS)}")
    common = dict(COMMON)
    if args.quick:
        common.update(QUICK)
        args.repeats = 1
        args.warmup = 1
        arms = [a for a in arms if a != "sync_2cpu"] if args.arms == ap.get_default("arms") else arms
    info = machine_info()
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="kexa_overlap_") as tmp:
        for repeat in range(args.repeats):
            for arm in arms:
                result = run_once(arm, {**common, **ARMS[arm]}, Path(tmp), args.timeout)
                row = {"repeat": repeat, **describe_run(arm, result, args.warmup)}
                runs.append(row)
                parts = (row["rollout_seconds_median"], row["learner_step_seconds_median"])
                print(
                    f"{arm} #{repeat}: {row['seconds_per_step']:.2f} s/step (median rollout {parts[0]} s, "
                    f"learner {parts[1]} s, staleness {row['staleness_median']}), "
                    f"process {row['process_wall_seconds']:.0f} s",
                    flush=True,
                )
    medians = {arm: median([r["seconds_per_step"] for r in runs if r["arm"] == arm]) for arm in arms}
    ratios = {}
    if "sync" in medians and "overlap" in medians:
        ratios["sync_over_overlap"] = medians["sync"] / medians["overlap"]
    if "sync_2cpu" in medians and "overlap" in medians:
        ratios["sync_2cpu_over_overlap"] = medians["sync_2cpu"] / medians["overlap"]
    for name, value in ratios.items():
        print(f"{name}: {value:.3f}", flush=True)
    write_json(
        args.out,
        {
            "benchmark": "overlap",
            "command": command_line(),
            "machine": info,
            "settings": {
                "recipe": RECIPE,
                "overrides": common,
                "arms": {a: ARMS[a] for a in arms},
                "repeats": args.repeats,
                "warmup_steps": args.warmup,
                "quick": args.quick,
                "order": "interleaved: every repeat runs each arm once, in the order of --arms",
            },
            "runs": runs,
            "seconds_per_step_median": medians,
            "ratios": ratios,
            "loadavg_at_end": list(os.getloadavg()),
            "total_seconds": time.perf_counter() - t0,
        },
    )


if __name__ == "__main__":
    main()
