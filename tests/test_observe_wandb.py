"""Weights & Biases logging in offline mode: the run folder W&B writes is read back (its ``.wandb``
record log and ``files/``) and must hold the scalars and the evaluation sample tables logged."""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import pytest

from kexaone_align.config import load_recipe
from kexaone_align.errors import KexaoneError

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("wandb")  # in the dev extra; skipped only where that extra is not installed


@pytest.fixture
def wandb_env(tmp_path, monkeypatch) -> Path:
    """Offline W&B with every folder it writes (runs, config, cache, staging) inside the test's tmp."""
    home = tmp_path / "wandb_home"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(home))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / "config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(home / "cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(home / "data"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return home


def read_wandb_records(path: Path) -> list:
    """Records of a ``.wandb`` file: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of
    chunks (crc32, length, type; type 1 = whole record, 2/3/4 = first/middle/last piece), each record a
    ``wandb_internal_pb2.Record`` protobuf."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:  # block trailer padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def finished_records(run_dir: Path, timeout_s: float = 30.0) -> list:
    """The run's records once its final ``exit`` record is on disk: ``run.finish()`` returns before
    wandb-core (a separate process) has necessarily flushed the last records of an offline run."""
    path = next(run_dir.glob("run-*.wandb"))
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            records = read_wandb_records(path)
        except Exception:  # a record caught mid-write
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def history_rows(records: list) -> list[dict]:
    """Each history record as {key: value}; nested keys joined with '.' (e.g. 'x/table.path')."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or ".".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return rows


def offline_run(root: Path) -> Path:
    (run,) = (root / "wandb").glob("offline-run-*")
    return run


def _recipe(tmp_path: Path, *overrides: str):
    return load_recipe(
        ROOT / "recipes/tiny/agapo.yaml",
        [f"run_dir={tmp_path / 'run'}", "logging.progress_bar=false", *overrides],
    )


def test_stage_run_logs_scalars_and_eval_tables_to_an_offline_run(tmp_path, wandb_env):
    from kexaone_align.stages.common import StageRun

    recipe = _recipe(
        tmp_path, "logging.wandb={project: kx-test, name: tiny-run, tags: [ci, tiny], table_rows: 2}"
    )
    rows = [
        {"prompt_id": "p0", "task": "math", "prompt": "1+1?", "response": "\\boxed{2}", "reward": 1.0,
         "reference": "2"},
        {"prompt_id": "p1", "task": "math", "prompt": "2+3?", "response": "\\boxed{6}", "reward": 0.0,
         "reference": "5"},
        {"prompt_id": "p2", "task": "math", "prompt": "3+3?", "response": "6", "reward": 1.0,
         "reference": "6"},
    ]  # fmt: skip
    with StageRun(recipe, total_steps=2) as run_:
        run_.log_samples("eval_before", rows)
        run_.log_eval({"eval_before/accuracy": 0.5})
        run_.log(
            {"loss": 0.25, "reward/mean": 0.5, "skipped": True, "not_a_number": float("nan"), "note": "x"}
        )
        run_.log({"loss": 0.125, "reward/mean": 0.75})
        run_.log_samples("eval_after", rows[:1])
        run_.log_eval({"eval_after/accuracy": 1.0})

    run_dir = offline_run(tmp_path / "run")  # logging.wandb.dir unset: the stage's run_dir
    assert not (wandb_env / "wandb").exists()
    records = finished_records(run_dir)
    (meta,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert meta.project == "kx-test" and meta.display_name == "tiny-run" and list(meta.tags) == ["ci", "tiny"]
    config = {u.key: json.loads(u.value_json) for u in meta.config.update}
    assert config["stage"] == "agapo" and config["agapo"]["group_size"] == 8  # the resolved recipe

    history = {row["_step"]: row for row in history_rows(records)}
    assert sorted(history) == [0, 1, 2]
    assert history[0]["agapo/eval_before/accuracy"] == 0.5
    assert history[1]["agapo/loss"] == 0.25 and history[1]["agapo/skipped"] == 1.0
    assert "agapo/not_a_number" not in history[1] and "agapo/note" not in history[1]
    assert history[2]["agapo/loss"] == 0.125 and history[2]["agapo/eval_after/accuracy"] == 1.0

    before = history[0]["agapo/eval_before_samples.path"]
    assert history[0]["agapo/eval_before_samples._type"] == "table-file"
    table = json.loads((run_dir / "files" / before).read_text())
    assert table["columns"] == ["prompt_id", "task", "prompt", "response", "reward", "reference"]
    assert table["data"] == [list(r.values()) for r in rows[:2]]  # table_rows: 2
    after = json.loads((run_dir / "files" / history[2]["agapo/eval_after_samples.path"]).read_text())
    assert after["data"] == [list(rows[0].values())]
    # the JSONL sink is unaffected
    lines = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2, 2]


def test_wandb_dir_and_disabled_mode(tmp_path, wandb_env):
    from kexaone_align.observe.wandb_logger import open_wandb

    recipe = _recipe(tmp_path, f"logging.wandb={{dir: {tmp_path / 'elsewhere'}}}")
    sink = open_wandb(recipe.logging.wandb, run_dir=tmp_path / "run", default_name="agapo", config={})
    sink.log("agapo", 1, {"loss": 1.5})
    sink.close()
    records = finished_records(offline_run(tmp_path / "elsewhere"))
    assert history_rows(records)[0]["agapo/loss"] == 1.5
    (meta,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert meta.project == "kexaone-align" and meta.display_name == "agapo"

    off = _recipe(tmp_path, "logging.wandb={mode: disabled}")
    sink = open_wandb(off.logging.wandb, run_dir=tmp_path / "off", default_name="agapo", config={})
    sink.log("agapo", 1, {"loss": 1.5})
    sink.close()
    assert not (tmp_path / "off" / "wandb").exists()


def test_wandb_not_installed_is_a_clear_error(tmp_path, monkeypatch):
    from kexaone_align.observe.wandb_logger import open_wandb

    recipe = _recipe(tmp_path, "logging.wandb={project: x}")
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(
        KexaoneError, match=r"logging.wandb is set but the 'wandb' package is not installed.*pip"
    ):
        open_wandb(recipe.logging.wandb, run_dir=tmp_path, default_name="x", config={})
    assert open_wandb(None, run_dir=tmp_path, default_name="x", config={}) is None


def test_wandb_section_is_validated(tmp_path):
    with pytest.raises(KexaoneError, match=r"logging.wandb.mode"):
        _recipe(tmp_path, "logging.wandb={mode: cloud}")
    with pytest.raises(KexaoneError, match=r"logging.wandb.table_rows"):
        _recipe(tmp_path, "logging.wandb={table_rows: -1}")
    assert _recipe(tmp_path).logging.wandb is None  # off unless asked for


def test_run_recipe_checks_for_wandb_before_starting(tmp_path, monkeypatch):
    from kexaone_align.stages import run_recipe

    recipe = _recipe(tmp_path, "logging.wandb={project: x}")
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(KexaoneError, match="'wandb' package is not installed"):
        run_recipe(recipe)
    assert not (tmp_path / "run").exists()  # nothing started
