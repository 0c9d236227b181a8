"""Fixed seed, fixed run: the same short AGAPO stage twice on one machine gives identical metrics.

The stage is pipelined (rollouts overlap learning) with two rollout workers and a periodic evaluation,
so Ray's scheduling of concurrent work has room to matter, and must not.

Everything a step logs is compared exactly (rewards, losses, gradient norms, importance ratios, the
sampled responses), except what measures time: seconds, throughput and time-to-accuracy clocks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def timing(key: str) -> bool:
    """Metrics that measure wall time (they differ between any two runs)."""
    return key.endswith(("seconds", "_s", "per_s", "time_s")) or "per_s" in key or key == "time"


def _run(run_dir: Path, verifier: Path) -> tuple[list[dict], list[dict], dict]:
    from kexaone_align.config import load_recipe
    from kexaone_align.stages import run_recipe

    overrides = [
        "agapo.steps=2", "agapo.prompts_per_step=2", "agapo.group_size=4", "agapo.lr=1e-3",
        "agapo.eval_every_steps=1", "rollout.max_new_tokens=6", "rollout.temperature=0.8",
        "rollout.num_workers=2", "rollout.max_staleness=1",
        "data.num_train=16", "data.num_eval=2", f"verifiers.math={verifier}:parity",
        "checkpoint.export=false", "logging.save_rollouts=true", "logging.progress_bar=false",
        "logging.plots=false", "logging.tensorboard=false", f"run_dir={run_dir}",
    ]  # fmt: skip
    summary = run_recipe(load_recipe(Path(__file__).parents[1] / "recipes/tiny/agapo.yaml", overrides))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rollouts = [json.loads(line) for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]
    return metrics, rollouts, summary


@pytest.mark.slow
def test_two_runs_of_a_short_agapo_stage_log_identical_metrics(
    tmp_path: Path, parity_verifier_file: Path
) -> None:
    import ray

    verifier = parity_verifier_file
    try:
        first = _run(tmp_path / "a", verifier)
        ray.shutdown()  # the second run starts its own Ray, as a second command would
        second = _run(tmp_path / "b", verifier)
    finally:
        ray.shutdown()
    (m1, r1, s1), (m2, r2, s2) = first, second
    assert [r["step"] for r in m1] == [r["step"] for r in m2]
    assert any("loss" in r for r in m1), "no learner step: the comparison would not cover training"
    for a, b in zip(m1, m2, strict=True):
        assert set(a) == set(b)
        differ = {k: (a[k], b[k]) for k in a if not timing(k) and a[k] != b[k]}
        assert not differ, f"step {a['step']}: {differ}"
    assert r1 == r2
    for key in ("eval_before", "eval_after", "policy_version", "skipped_steps", "filtered_prompts"):
        assert s1[key] == s2[key], key
