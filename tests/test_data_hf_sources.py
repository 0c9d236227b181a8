"""Prompt and SFT data from Hugging Face ``datasets``: saved folders, files, cached names, column mapping
and answer extraction for GSM8K-, MATH- and chat-shaped datasets. Every dataset is built here with
``datasets`` (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from kexaone_align.config import load_recipe
from kexaone_align.data.columns import ColumnMap
from kexaone_align.data.extract import boxed_answer, extract_answer, gsm8k_answer
from kexaone_align.data.prompts import load_prompt_set
from kexaone_align.data.sft import load_chat_dataset
from kexaone_align.data.sources import SourceOptions, read_rows
from kexaone_align.errors import KexaoneError

ROOT = Path(__file__).resolve().parents[1]

GSM8K = {
    "question": [
        "Natalia sold clips to 48 friends in April, and half as many in May. How many in all?",
        "A shop sells 1,000 pens a day for 2 days and 200 on the third. How many pens?",
        "Tom has 5 apples and eats 7. How many does he have?",
    ],
    "answer": [
        "In May she sold 48/2 = <<48/2=24>>24 clips.\n48+24 = <<48+24=72>>72\n#### 72",
        "2*1000 = <<2*1000=2000>>2000, 2000+200 = 2200\n#### 2,200",
        "5-7 = -2\n#### -2",
    ],
}
MATH = {
    "problem": ["Simplify $\\frac{2}{4}$.", "Solve $x^2=4$ for $x>0$.", "Write $\\{1,2\\}$ as a set."],
    "solution": [
        "Divide by 2 to get $\\boxed{\\frac{1}{2}}$.",
        "First $x=\\boxed{-2}$ or $x=2$; positive: $\\boxed{2}$.",
        "The set is $\\boxed{\\{1, 2\\}}$.",
    ],
    "level": ["Level 1", "Level 2", "Level 1"],
}
CHAT = {
    "messages": [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "It is \\boxed{4}."},
        ],
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "What is 3+3?"},
            {"role": "assistant", "content": "\\boxed{6}"},
        ],
    ]
}


# ---------------------------------------------------------------------------------- extractors
@pytest.mark.parametrize(
    "text, want",
    [("a\n#### 72", "72"), ("#### 2,200", "2200"), ("x #### -3.5 ", "-3.5"), ("#### 1 #### 9", "9")],
)
def test_gsm8k_extractor(text, want):
    assert gsm8k_answer(text) == want


@pytest.mark.parametrize(
    "text, want",
    [
        ("so $\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"),
        ("$\\boxed{1}$ then $\\boxed{ \\sqrt{\\frac{a}{b}} }$", "\\sqrt{\\frac{a}{b}}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\fbox{x^{2}}", "x^{2}"),
        ("\\boxed {7} and an unclosed \\boxed{8", "7"),
    ],
)
def test_boxed_extractor_keeps_nested_braces_and_takes_the_last(text, want):
    assert boxed_answer(text) == want


def test_extractor_failures_name_the_row():
    with pytest.raises(KexaoneError, match=r"row 3: answer extractor 'gsm8k' found no '#### <answer>' line"):
        extract_answer("gsm8k", "the answer is 4", "row 3")
    with pytest.raises(KexaoneError, match=r"row 1: answer extractor 'boxed' found no closed"):
        extract_answer("boxed", "\\boxed{4", "row 1")
    with pytest.raises(KexaoneError, match="must be text"):
        extract_answer("boxed", 4, "row 0")
    assert extract_answer("raw", 4, "row 0") == "4"


# ------------------------------------------------------------------------------------ sources
def test_gsm8k_shaped_saved_dataset_becomes_math_prompts(tmp_path):
    saved = tmp_path / "gsm8k"
    datasets.Dataset.from_dict(GSM8K).save_to_disk(str(saved))
    rows = load_prompt_set(saved, columns=ColumnMap.with_preset("gsm8k"))
    assert [r.reference for r in rows] == ["72", "2200", "-2"]
    assert {r.task for r in rows} == {"math"}
    assert rows[0].messages == [{"role": "user", "content": GSM8K["question"][0]}]
    assert rows[1].id == "gsm8k row 1" and rows[0].metadata == {}


def test_math_shaped_dataset_dict_with_splits_template_and_system_prompt(tmp_path):
    saved = tmp_path / "math"
    full = datasets.Dataset.from_dict(MATH)
    datasets.DatasetDict({"train": full.select([0, 1]), "test": full.select([2])}).save_to_disk(str(saved))
    cm = ColumnMap.with_preset(
        "math", prompt_template="{prompt} Put the answer in \\boxed{}.", system_prompt="Think.", id="level"
    )
    train = load_prompt_set(saved, columns=cm, options=SourceOptions(split="train"))
    assert [r.reference for r in train] == ["\\frac{1}{2}", "2"]  # the last box of a solution
    assert train[0].messages == [
        {"role": "system", "content": "Think."},
        {"role": "user", "content": "Simplify $\\frac{2}{4}$. Put the answer in \\boxed{}."},
    ]
    assert [r.id for r in train] == ["Level 1", "Level 2"]
    test = load_prompt_set(saved, columns=cm, options=SourceOptions(split="test"))
    assert [r.reference for r in test] == ["\\{1, 2\\}"]
    with pytest.raises(KexaoneError, match=r"no split 'validation' \(has train, test\)"):
        load_prompt_set(saved, columns=cm, options=SourceOptions(split="validation"))


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv"])
def test_every_file_type_maps_the_same(tmp_path, kind):
    ds = datasets.Dataset.from_dict(GSM8K)
    path = tmp_path / f"gsm8k.{kind}"
    if kind == "json":
        path.write_text(json.dumps(ds.to_list()))
    else:
        getattr(ds, f"to_{kind if kind != 'jsonl' else 'json'}")(str(path))
    rows = load_prompt_set(str(path), columns=ColumnMap.with_preset("gsm8k"))
    assert [r.reference for r in rows] == ["72", "2200", "-2"]


def test_chat_column_prompts_end_before_the_final_answer(tmp_path):
    saved = tmp_path / "chat"
    datasets.Dataset.from_dict(CHAT).save_to_disk(str(saved))
    history = load_prompt_set(
        saved, columns=ColumnMap.with_preset("chat", task="math", reference_extractor="boxed")
    )
    assert [m["role"] for m in history[1].messages] == ["user", "assistant", "user"]
    assert [r.reference for r in history] == ["4", "6"]
    last = load_prompt_set(saved, columns=ColumnMap.with_preset("chat", task="math", chat_prompt="last_user"))
    assert last[1].messages == [{"role": "user", "content": "What is 3+3?"}]
    assert last[0].reference == "It is \\boxed{4}."  # raw extractor: the whole final turn


def test_sft_from_chat_gsm8k_and_math_shapes(tmp_path):
    chat = tmp_path / "chat"
    datasets.Dataset.from_dict(CHAT).save_to_disk(str(chat))
    ds = load_chat_dataset(chat, columns=ColumnMap.with_preset("chat"))
    assert ds[1]["messages"] == CHAT["messages"][1] and ds[0]["enable_thinking"] is True
    gsm = tmp_path / "gsm.parquet"
    datasets.Dataset.from_dict(GSM8K).to_parquet(str(gsm))
    ds = load_chat_dataset(gsm, columns=ColumnMap.with_preset("gsm8k"))
    assert ds[0]["messages"] == [
        {"role": "user", "content": GSM8K["question"][0]},
        {"role": "assistant", "content": GSM8K["answer"][0]},
    ]
    math = tmp_path / "math"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(MATH)}).save_to_disk(str(math))
    assert (
        load_chat_dataset(math, columns=ColumnMap.with_preset("math"))[2]["messages"][1]["content"]
        == (MATH["solution"][2])
    )


def test_errors_name_the_column_the_key_and_the_source(tmp_path):
    saved = tmp_path / "gsm8k"
    datasets.Dataset.from_dict(GSM8K).save_to_disk(str(saved))
    with pytest.raises(
        KexaoneError, match=r"gsm8k row 0: no column 'problem' \(named by data.columns.prompt\)"
    ):
        load_prompt_set(saved, columns=ColumnMap.with_preset("math"))
    with pytest.raises(KexaoneError, match=r"no column 'messages'.*the row has 'question', 'answer'"):
        load_chat_dataset(saved, columns=ColumnMap.with_preset("chat"))
    with pytest.raises(KexaoneError, match=r"gsm8k row 0: answer extractor 'boxed' found no closed"):
        load_prompt_set(saved, columns=ColumnMap.with_preset("gsm8k", reference_extractor="boxed"))
    with pytest.raises(KexaoneError, match="does not exist"):
        load_prompt_set(tmp_path / "nope", columns=ColumnMap.with_preset("gsm8k"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "dataset_info.json").write_text("{not json")
    with pytest.raises(KexaoneError, match="is not a readable save_to_disk dataset"):
        load_prompt_set(broken)
    with pytest.raises(
        KexaoneError, match=r"missing field 'messages'.*look gsm8k-shaped: set data.columns.preset"
    ):
        load_prompt_set(saved)  # no mapping given
    math = tmp_path / "math.jsonl"
    datasets.Dataset.from_dict(MATH).to_json(str(math))
    with pytest.raises(KexaoneError, match=r"math.jsonl line 1: missing field 'messages'.*preset: math"):
        load_chat_dataset(math)
    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_text("not parquet")
    with pytest.raises(KexaoneError, match=r"bad.parquet: cannot be read as parquet"):
        load_prompt_set(bad_parquet)


def test_a_folder_laid_out_like_a_hub_snapshot_reads_its_configs_and_splits(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "snapshot"
    (root / "main").mkdir(parents=True)
    (root / "socratic").mkdir()
    full = datasets.Dataset.from_dict(GSM8K)
    full.select([0, 1]).to_parquet(str(root / "main/train-00000-of-00001.parquet"))
    full.select([2]).to_parquet(str(root / "main/test-00000-of-00001.parquet"))
    full.select([1]).to_parquet(str(root / "socratic/train-00000-of-00001.parquet"))
    configs = "".join(
        f"- config_name: {name}\n  data_files:\n"
        + "".join(f"  - split: {split}\n    path: {name}/{split}-*\n" for split in splits)
        for name, splits in (("main", ("train", "test")), ("socratic", ("train",)))
    )
    (root / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")
    cm = ColumnMap.with_preset("gsm8k")

    def refs(**opts):
        return [r.reference for r in load_prompt_set(root, columns=cm, options=SourceOptions(**opts))]

    assert refs(config_name="main") == ["72", "2200"] and refs(config_name="main", split="test") == ["-2"]
    assert refs(config_name="socratic") == ["2200"]
    with pytest.raises(KexaoneError, match=r"snapshot: cannot be read as a dataset folder.*'nope' not found"):
        refs(config_name="nope")


# --------------------------------------------------------------------------- dataset names
def _cache_like_an_online_load(cache: Path, tmp: Path) -> None:
    """Write into ``cache`` what ``load_dataset('openai/gsm8k', 'main')`` leaves there after an online
    run (``<cache>/openai___gsm8k/main/0.0.0/<hash>/`` with Arrow files and dataset_info.json): built
    with the parquet builder from local files, then moved to the name's place, since nothing here may
    reach the hub."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    full = datasets.Dataset.from_dict(GSM8K)
    files = {"train": str(tmp / "train.parquet"), "test": str(tmp / "test.parquet")}
    full.select([0, 1]).to_parquet(files["train"])
    full.select([2]).to_parquet(files["test"])
    build = tmp / "build"
    builder = Parquet(
        cache_dir=str(build), dataset_name="gsm8k", config_name="main", data_files=files, hash="c0ffee"
    )
    builder.download_and_prepare()
    (built,) = (build / "gsm8k").iterdir()  # main-<hash of the data files>
    (cache / "openai___gsm8k").mkdir(parents=True)
    built.rename(cache / "openai___gsm8k" / "main")


def test_a_dataset_name_resolves_from_the_local_cache_offline(tmp_path, monkeypatch):
    cache = tmp_path / "hf_cache"
    _cache_like_an_online_load(cache, tmp_path)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # our loader must switch it on itself

    def no_network(*args, **kwargs):
        raise AssertionError("the hub was contacted")

    monkeypatch.setattr("huggingface_hub.HfApi.hf_hub_download", no_network)
    monkeypatch.setattr("huggingface_hub.HfApi.dataset_info", no_network)
    opts = SourceOptions(split="train", config_name="main", cache_dir=str(cache))
    rows = load_prompt_set("openai/gsm8k", columns=ColumnMap.with_preset("gsm8k"), options=opts)
    assert [r.reference for r in rows] == ["72", "2200"] and rows[0].id == "openai/gsm8k row 0"
    test = load_prompt_set("openai/gsm8k", columns=ColumnMap.with_preset("gsm8k"), options=SourceOptions(
        split="test", cache_dir=str(cache)))  # fmt: skip
    assert [r.reference for r in test] == ["-2"]
    assert datasets.config.HF_HUB_OFFLINE is False  # restored
    with pytest.raises(KexaoneError, match=r"'openai/gsm8k'.*Unknown split \"dev\".*data.split"):
        list(read_rows("openai/gsm8k", "prompt set", SourceOptions(split="dev", cache_dir=str(cache))))
    with pytest.raises(
        KexaoneError, match=r"'someone/absent'.*not found in the local Hugging Face datasets cache"
    ):
        list(read_rows("someone/absent", "prompt set", SourceOptions(cache_dir=str(cache))))


# ---------------------------------------------------------------------------------- recipes
def _agapo(tmp_path: Path, *overrides: str):
    return load_recipe(
        ROOT / "recipes/tiny/agapo.yaml", ["data.generator=null", f"run_dir={tmp_path}/run", *overrides]
    )


def test_recipe_reads_train_and_eval_splits_with_the_preset(tmp_path):
    from kexaone_align.stages.rl import load_prompt_rows

    saved = tmp_path / "gsm8k"
    full = datasets.Dataset.from_dict(GSM8K)
    datasets.DatasetDict({"train": full.select([0, 1]), "test": full.select([2])}).save_to_disk(str(saved))
    recipe = _agapo(
        tmp_path, f"data.train_files=[{saved}]", "data.columns.preset=gsm8k", "data.eval_split=test"
    )
    train, held = load_prompt_rows(recipe)
    assert [r.reference for r in train] == ["72", "2200"] and [r.reference for r in held] == ["-2"]
    recipe = _agapo(tmp_path, f"data.train_files=[{saved}]", f"data.eval_files=[{saved}]",
                    "data.columns.preset=gsm8k", "data.eval_split=test")  # fmt: skip
    assert [r.reference for r in load_prompt_rows(recipe)[1]] == ["-2"]


def test_recipe_sft_rows_from_a_mapped_dataset(tmp_path):
    from kexaone_align.stages.sft import load_sft_rows

    saved = tmp_path / "math"
    datasets.Dataset.from_dict(MATH).save_to_disk(str(saved))
    recipe = load_recipe(ROOT / "recipes/tiny/sft.yaml", [
        "data.generator=null", f"data.train_files=[{saved}]", "data.columns.prompt=problem",
        "data.columns.response=solution", "data.eval_fraction=0.34",
    ])  # fmt: skip
    train, held = load_sft_rows(recipe)
    assert len(train) == 2 and len(held) == 1
    assert {r["messages"][0]["content"] for r in train + held} == set(MATH["problem"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["data.columns.prompt=question"],
            r"data.columns.task.*: rows mapped from columns need a verifier task",
        ),
        (["data.columns.reference=answer"], r"data.columns.*reference set, but no 'prompt' or 'messages'"),
        (["data.columns.preset=gsm8k", "data.columns.prompt_template=Q"], "must contain '{prompt}'"),
        (["data.columns.preset=gsm9k"], "data.columns.preset"),
        (["data.eval_split=train"], r"data.eval_split: 'train' is also data.split"),
    ],
)
def test_recipe_mistakes_are_named(tmp_path, overrides, message):
    from kexaone_align.stages.rl import load_prompt_rows

    with pytest.raises(KexaoneError, match=message):
        recipe = _agapo(tmp_path, "data.train_files=[x.jsonl]", *overrides)
        load_prompt_rows(recipe)


def test_recipe_reads_a_math_shaped_dataset(tmp_path):
    from kexaone_align.stages.rl import load_prompt_rows

    saved = tmp_path / "math"
    full = datasets.Dataset.from_dict(MATH)
    datasets.DatasetDict({"train": full.select([0, 1]), "test": full.select([2])}).save_to_disk(str(saved))
    template = "data.columns.prompt_template='{prompt} Box the answer.'"  # quoted: YAML reads {..} as a map
    columns = ["data.columns.preset=math", "data.eval_split=test", template]
    recipe = _agapo(tmp_path, f"data.train_files=[{saved}]", *columns)
    train, held = load_prompt_rows(recipe)
    assert [r.reference for r in train] == ["\\frac{1}{2}", "2"] and held[0].reference == "\\{1, 2\\}"
    assert train[1].messages[0]["content"] == MATH["problem"][1] + " Box the answer."
    assert train[0].metadata == {"level": "Level 1"}  # unmapped columns reach the verifier's metadata


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tiny_agapo_run_on_a_saved_gsm8k_dataset_by_recipe_alone(tmp_path, monkeypatch):
    """The recipe names a save_to_disk GSM8K-shaped DatasetDict, its preset and splits; the run trains
    on the train split, evaluates on the test split, and (with logging.wandb, offline) logs the
    evaluation samples with the extracted references."""
    pytest.importorskip("wandb")
    import sys

    from kexaone_align.stages import agapo

    sys.path.insert(0, str(Path(__file__).parent))
    from test_observe_wandb import finished_records, history_rows, offline_run

    for var, sub in (("WANDB_DIR", ""), ("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"),
                     ("WANDB_DATA_DIR", "data")):  # fmt: skip
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    saved = tmp_path / "gsm8k"
    full = datasets.Dataset.from_dict(GSM8K)
    datasets.DatasetDict({"train": full.select([0, 1]), "test": full.select([2])}).save_to_disk(str(saved))
    recipe = _agapo(
        tmp_path, f"data.train_files=[{saved}]", "data.columns.preset=gsm8k", "data.eval_split=test",
        "agapo.steps=1", "agapo.prompts_per_step=2", "agapo.group_size=2", "rollout.max_new_tokens=6",
        "logging.progress_bar=false", "logging.plots=false", "checkpoint.export=false",
        "logging.wandb={project: kx-test}",
    )  # fmt: skip
    summary = agapo.run(recipe)
    assert summary["steps"] == 1 and summary["eval_after"]["num_samples"] == 1.0
    rollouts = [json.loads(x) for x in (tmp_path / "run/rollouts.jsonl").read_text().splitlines()]
    assert {r["prompt_id"] for r in rollouts} == {"gsm8k row 0", "gsm8k row 1"} and len(rollouts) == 4
    assert {r["task"] for r in rollouts} == {"math"}
    records = finished_records(offline_run(tmp_path / "run"))
    tables = [
        (row["_step"], row[k]) for row in history_rows(records) for k in row if k.endswith("_samples.path")
    ]
    assert [step for step, _ in tables] == [0, 1]  # eval_before, eval_after
    for _, path in tables:
        table = json.loads((offline_run(tmp_path / "run") / "files" / path).read_text())
        (sample,) = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
        assert sample["reference"] == "-2" and sample["prompt"] == GSM8K["question"][2]
        assert sample["reward"] in (0.0, 1.0)
