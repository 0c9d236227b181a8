"""Handlers for ``kexaone-align verifiers`` (list what is registered) and ``kexaone-align verify``
(score a JSONL file of rollouts offline and print per-task statistics). The CLI module wires them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from kexaone_align.verifiers.api import _LOCK, _REGISTRY, Sample, registered_names
from kexaone_align.verifiers.batch import BatchResult, TaskRouter, score_batch
from kexaone_align.verifiers.loading import resolve_verifier

from kexaone_align.errors import KexaoneError

_ROW_FIELDS = ("prompt", "response", "reference", "task", "metadata")


def add_verifiers_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``kexaone-align verifiers``."""
    parser.add_argument("--json", action="store_true", help="print the list as JSON")


def _describe(name: str) -> str:
    with _LOCK:
        factory = _REGISTRY.get(name)
    if getattr(factory, "entry_point_placeholder", False):
        return "installed plugin (entry point, loaded on first use)"
    target = getattr(factory, "__defaults__", None)
    obj = target[0] if target else factory
    doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
    return doc[0] if doc else ""


def verifiers_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """List registered verifiers, one per line with a short description."""
    out = out or sys.stdout
    names = registered_names()
    if getattr(args, "json", False):
        out.write(json.dumps([{"name": n, "description": _describe(n)} for n in names], indent=2) + "\n")
        return 0
    width = max((len(n) for n in names), default=4)
    for n in names:
        out.write(f"{n:<{width}}  {_describe(n)}\n")
    return 0


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``kexaone-align verify``."""
    parser.add_argument("--data", required=True, help="JSONL with prompt, response, reference, task fields")
    parser.add_argument("--verifier", help="grade every row with this verifier instead of routing by task")
    parser.add_argument(
        "--route",
        action="append",
        default=[],
        metavar="TASK=REF",
        help="send TASK to verifier REF (name, module:attr or file.py:attr); repeatable",
    )
    parser.add_argument("--default", help="verifier for tasks with no route (default: reward 0, counted)")
    parser.add_argument("--task", default="math", help="task of rows without a 'task' field (default: math)")
    parser.add_argument("--max-workers", type=int, default=8, help="samples graded at once")
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds allowed per sample (default: each verifier's own worst case, else 60)",
    )
    parser.add_argument("--out", help="write the rows with 'reward' and 'details' added to this JSONL file")


def _row_to_sample(row: Any, where: str, default_task: str) -> Sample:
    if not isinstance(row, dict):
        raise KexaoneError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if not isinstance(row.get("response"), str):
        raise KexaoneError(f"{where}: 'response' must be a string (got {type(row.get('response')).__name__})")
    task = row.get("task", default_task)
    if not isinstance(task, str) or not task:
        raise KexaoneError(f"{where}: 'task' must be a non-empty string, got {task!r}")
    metadata = row.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise KexaoneError(f"{where}: 'metadata' must be an object, got {type(metadata).__name__}")
    extras = {k: v for k, v in row.items() if k not in _ROW_FIELDS}
    return Sample(
        prompt=row.get("prompt"),
        response=row["response"],
        reference=row.get("reference"),
        task=task,
        metadata={**extras, **metadata},
    )


def read_rollouts(path: str | Path, default_task: str = "math") -> tuple[list[dict[str, Any]], list[Sample]]:
    """Rows and samples of a rollouts JSONL file; a bad line raises ``KexaoneError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise KexaoneError(f"--data file {str(path)!r} does not exist")
    rows, samples = [], []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise KexaoneError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            samples.append(_row_to_sample(row, where, default_task))
            rows.append(row)
    if not samples:
        raise KexaoneError(f"--data file {str(path)!r} has no rows")
    return rows, samples


def _grader(args: argparse.Namespace) -> Any:
    if args.verifier:
        return resolve_verifier(args.verifier)
    mapping = None
    if args.route:
        mapping = {}
        for item in args.route:
            task, sep, ref = item.partition("=")
            if not sep or not task or not ref:
                raise KexaoneError(f"--route {item!r} must look like TASK=VERIFIER")
            mapping[task] = ref
    return TaskRouter(mapping, default=args.default)


def format_stats(result: BatchResult) -> str:
    """Per-task table: count, mean reward, errors, timeouts, unrouted, and a total line."""
    header = f"{'task':<24} {'count':>6} {'mean_reward':>11} {'errors':>6} {'timeouts':>8} {'unrouted':>8}"
    lines = [header]
    for task in sorted(result.per_task):
        s = result.per_task[task]
        lines.append(
            f"{task:<24} {s.count:>6} {s.mean_reward:>11.4f} {s.errors:>6} {s.timeouts:>8} {s.unrouted:>8}"
        )
    n = len(result.results)
    mean = sum(result.rewards) / n if n else 0.0
    lines.append(
        f"{'all':<24} {n:>6} {mean:>11.4f} {result.errors:>6} {result.timeouts:>8} {result.unrouted:>8}"
    )
    return "\n".join(lines)


def verify_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Score ``--data`` offline, print per-task statistics, optionally write scored rows to ``--out``."""
    out = out or sys.stdout
    rows, samples = read_rollouts(args.data, getattr(args, "task", "math") or "math")
    result = score_batch(
        samples, _grader(args), max_workers=args.max_workers, timeout_s=args.timeout or "auto"
    )
    out.write(format_stats(result) + "\n")
    out.write(f"scored {len(samples)} rows in {result.elapsed_s:.2f}s\n")
    if args.out:
        dest = Path(args.out)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with dest.open("w", encoding="utf-8") as f:
            for row, res in zip(rows, result.results, strict=True):
                f.write(json.dumps({**row, "reward": res.reward, "details": res.details}, default=str) + "\n")
        out.write(f"wrote {dest}\n")
    return 0
