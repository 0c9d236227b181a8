"""The SFT stage end to end through the real Ray + DeepSpeed learner path, tiny recipe, a few steps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from kexaone_align.config import load_recipe
from kexaone_align.data.tiny_tasks import generate_rows
from kexaone_align.errors import KexaoneError
from kexaone_align.observe import read_metrics
from kexaone_align.runtime.checkpoint import COMPLETE_MARKER, complete_checkpoints, step_dir_name
from kexaone_align.stages import run_recipe
from kexaone_align.stages.sft import make_batch, pack_rows, step_rows, total_steps

ROOT = Path(__file__).resolve().parents[1]
SFT_RECIPE = ROOT / "recipes" / "tiny" / "sft.yaml"
FAST = [
    "sft.max_steps=4",
    "sft.epochs=3",  # 64 conversations pack into fewer rows than 4 batches: epochs, capped at 4 steps
    "sft.batch_size=8",
    "data.num_train=64",
    "data.num_eval=4",
    "learners.warmup_steps=1",
    "checkpoint.every_steps=2",
    "checkpoint.keep_last=2",
    "logging.progress_bar=false",
]


def fast_recipe(run_dir: Path, *extra: str):
    return load_recipe(SFT_RECIPE, [*FAST, f"run_dir={run_dir}", *extra])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("sft") / "run"
    summary = run_recipe(fast_recipe(run_dir))
    return run_dir, summary


def test_step_rows_cover_each_epoch_once_and_repeat_on_resume() -> None:
    per_epoch = [i for step in range(4) for i in step_rows(30, 8, step, seed=3, shuffle=True)]
    assert sorted(per_epoch) == list(range(30))  # 4 steps of 8 (last one short) = one epoch
    assert step_rows(30, 8, 5, seed=3, shuffle=True) == step_rows(30, 8, 5, seed=3, shuffle=True)
    assert step_rows(30, 8, 4, seed=3, shuffle=True) != step_rows(30, 8, 0, seed=3, shuffle=True)


def test_total_steps_epochs_capped_by_max_steps(tmp_path: Path) -> None:
    recipe = load_recipe(SFT_RECIPE, ["sft.epochs=3", "sft.batch_size=16", f"run_dir={tmp_path}"])
    assert total_steps(recipe, 100) == 3 * 7
    capped = load_recipe(SFT_RECIPE, ["sft.epochs=3", "sft.max_steps=5", f"run_dir={tmp_path}"])
    assert total_steps(capped, 100) == 5


@pytest.mark.slow
def test_sft_run_writes_metrics_plots_summary_and_loadable_export(finished_run: tuple[Path, dict]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, summary = finished_run
    rows = read_metrics(run_dir / "metrics.jsonl", stage="sft")
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for row in train:
        for key in ("loss", "lr", "grad_norm", "learner_tokens_per_s"):
            assert isinstance(row[key], float) and row[key] == row[key], key
    evals = [r for r in rows if "eval_loss" in r]
    assert evals and evals[-1]["step"] == 4
    assert (run_dir / "plots" / "sft_loss.png").stat().st_size > 0

    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["steps"] == 4 and on_disk["stage"] == "sft"
    assert on_disk["eval"]["eval_loss"] == pytest.approx(evals[-1]["eval_loss"])
    assert 0.0 <= on_disk["eval"]["eval_accuracy"] <= 1.0
    assert on_disk["eval"]["accuracy"] == on_disk["eval"]["eval_accuracy"]  # the key summaries share
    assert summary["export"] == str(run_dir / "export")
    assert 0 < on_disk["data"]["packed_rows"] < on_disk["data"]["train_rows"] == 64  # the recipe packs

    exported = AutoModelForCausalLM.from_pretrained(run_dir / "export")
    initial = AutoModelForCausalLM.from_pretrained(run_dir / "init")
    tok = AutoTokenizer.from_pretrained(run_dir / "export")
    assert tok.chat_template and "<|assistant|>" in tok.get_vocab()
    changed = [
        name
        for (name, a), (_, b) in zip(exported.named_parameters(), initial.named_parameters(), strict=True)
        if not torch.equal(a, b)
    ]
    assert "lm_head.weight" in changed and len(changed) > 10
    # step 2 and step 4 checkpoints, both complete (keep_last=2)
    assert [s for s, _ in complete_checkpoints(run_dir / "checkpoints")] == [2, 4]


@pytest.mark.slow
def test_sft_loss_decreases(finished_run: tuple[Path, dict]) -> None:
    run_dir, _ = finished_run
    losses = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl", stage="sft") if "loss" in r]
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.slow
def test_resume_auto_continues_from_newest_complete_checkpoint(
    finished_run: tuple[Path, dict], tmp_path: Path
) -> None:
    source, _ = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    # Simulate a crash while step 4's checkpoint was being written: it never got its COMPLETE marker,
    # and a temporary directory was left behind; the run died before exporting.
    (run_dir / "checkpoints" / step_dir_name(4) / COMPLETE_MARKER).unlink()
    shutil.copytree(
        run_dir / "checkpoints" / step_dir_name(2), run_dir / "checkpoints" / f"{step_dir_name(6)}.tmp-1"
    )
    shutil.rmtree(run_dir / "export")
    (run_dir / "summary.json").unlink()
    original = [r for r in read_metrics(run_dir / "metrics.jsonl", stage="sft") if "loss" in r]
    with open(run_dir / "metrics.jsonl", "a") as fh:  # the crash cut the last line short
        fh.write('{"stage": "sft", "step": 4, "lo')

    summary = run_recipe(fast_recipe(run_dir))
    assert summary["resumed_from"].endswith(step_dir_name(2))
    assert summary["steps"] == 4
    rows = read_metrics(run_dir / "metrics.jsonl", stage="sft")
    resumed = [r for r in rows if "loss" in r]
    # rows the crashed run logged after its last complete checkpoint are replaced, not duplicated
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "eval_loss" in r] == [4]
    # Same data order and restored weights/optimizer/LR state: steps 3-4 match the uninterrupted run.
    for got, want in zip(resumed[2:], original[2:], strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
        assert got["lr"] == pytest.approx(want["lr"])
    assert (run_dir / "export" / "config.json").is_file()


def test_resume_from_path_that_is_not_a_checkpoint_is_a_user_error(tmp_path: Path) -> None:
    from kexaone_align.stages.common import StageRun

    recipe = fast_recipe(tmp_path / "run", f"checkpoint.resume={tmp_path / 'nowhere'}")
    with StageRun(recipe, 4) as run, pytest.raises(KexaoneError, match="not a complete checkpoint"):
        run.resume_point()


def test_sft_rows_from_files_with_held_out_fraction(tmp_path: Path) -> None:
    from kexaone_align.stages.sft import load_sft_rows

    rows = generate_rows("tiny_arithmetic", "sft", 20, 0, "train")
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    recipe = load_recipe(
        SFT_RECIPE,
        [
            "data.generator=null",
            f"data.train_files=[{path}]",
            "data.eval_fraction=0.25",
            f"run_dir={tmp_path}",
        ],
    )
    train, held = load_sft_rows(recipe)
    assert (len(train), len(held)) == (15, 5)
    assert {json.dumps(r["messages"]) for r in train}.isdisjoint({json.dumps(r["messages"]) for r in held})


def test_make_batch_packed_rows_carry_sequence_ids_and_keep_every_trained_token() -> None:
    rows = [([5] * n, [0, 0] + [1] * (n - 2)) for n in (10, 7, 12, 6, 9)]
    packed = pack_rows(rows, 24, seed=0)
    assert sorted(i for r in packed for i in r.example_indices) == list(range(5))
    batch = make_batch(packed, pad_token_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "loss_mask", "sequence_ids"}
    assert batch["input_ids"].shape[0] == len(packed) < len(rows)
    # every conversation's first token is never a target, the rest of the assistant tokens still are
    assert int(batch["loss_mask"].sum()) == sum(sum(m) for _, m in rows)
    assert torch.equal(batch["attention_mask"], (batch["sequence_ids"] >= 0).long())
    plain = make_batch(rows, pad_token_id=0)
    assert "sequence_ids" not in plain and plain["input_ids"].shape == (5, 12)
