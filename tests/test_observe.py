"""Metrics land in JSONL and TensorBoard, survive a torn line, and turn into PNG plots."""

import math

from kexaone_align.observe import MetricsLogger, Progress, plot_metrics, read_metrics


def test_metrics_jsonl_tensorboard_and_plots(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        for step in range(3):
            logger.log("agapo", step, {"loss": 1.0 / (step + 1), "reward/math": 0.1 * step, "note": "x"})
        logger.log("agapo", 3, {"loss": math.nan})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"stage": "agapo", "step": 9, "lo')  # a crash mid-write
    rows = read_metrics(tmp_path / "metrics.jsonl", stage="agapo")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[1]["loss"] == 0.5 and rows[0]["note"] == "x"
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())
    written = plot_metrics(rows, tmp_path / "plots")
    names = sorted(p.name for p in written)
    assert names == ["agapo_loss.png", "agapo_reward.png"]  # per-task "reward/<task>" keys are found
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)


def test_progress_accepts_partial_metrics():
    bar = Progress("sft", total=2, enabled=False)
    bar.update({"loss": 0.5})
    bar.update({})
    bar.close()


def test_drop_rows_rewrites_jsonl_and_keeps_logging(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        logger.log("agapo", step, {"loss": float(step)})
    logger.log("sft", 9, {"loss": 9.0})
    with open(logger.jsonl_path, "a", encoding="utf-8") as fh:
        fh.write('{"stage": "agapo", "step": 4, "lo')  # a line torn by a crash
    logger.drop_rows(lambda row: row["stage"] != "agapo" or row["step"] <= 1)
    logger.log("agapo", 2, {"loss": 0.5})  # the resumed run appends after the kept rows
    logger.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["stage"], r["step"], r["loss"]) for r in rows] == [
        ("agapo", 1, 1.0),
        ("sft", 9, 9.0),
        ("agapo", 2, 0.5),
    ]
