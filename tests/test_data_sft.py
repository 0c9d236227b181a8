"""SFT datasets: loading from every source, row validation, assistant-only tokenization, splits."""

from __future__ import annotations

import json
import logging

import datasets
import pytest

from kexaone_align.data.sft import load_chat_dataset, tokenize_sft_rows, train_eval_split
from kexaone_align.errors import KexaoneError

ROLE_IDS = {"system": 1, "user": 2, "assistant": 3, "tool": 4}
EOT = 5


def stand_in_tokenize(tokenizer, messages, enable_thinking):
    """Char-level stand-in for chat_format.tokenize_conversation: header, content chars, end of turn."""
    ids, mask = [], []
    for m in messages:
        body = [10 + (ord(c) % 200) for c in m["content"]]
        trained = 1 if m["role"] == "assistant" else 0
        ids += [ROLE_IDS[m["role"]], *body, EOT]
        mask += [0, *[trained] * len(body), trained]
    return ids, mask


def _conv(q: str, a: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], **extra}


ROWS = [_conv(f"q{i}", f"answer {i}", enable_thinking=i % 2 == 0) for i in range(10)]


def test_load_from_every_local_source(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    as_json = tmp_path / "d.json"
    as_json.write_text(json.dumps(ROWS))
    parquet = tmp_path / "d.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(parquet))
    disk = tmp_path / "disk"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(disk))
    dict_disk = tmp_path / "dict_disk"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:4])}).save_to_disk(str(dict_disk))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3]))
    (folder / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[3:5]))

    for source, n in [(jsonl, 10), (as_json, 10), (parquet, 10), (disk, 10), (dict_disk, 4), (folder, 5)]:
        ds = load_chat_dataset(source)
        assert isinstance(ds, datasets.Dataset) and len(ds) == n, source
        assert ds[1]["messages"] == ROWS[1]["messages"]
    assert load_chat_dataset(str(jsonl))[1]["enable_thinking"] is False
    assert len(load_chat_dataset([jsonl, str(parquet), folder])) == 25
    with pytest.raises(KexaoneError, match="list of files is empty"):
        load_chat_dataset([])
    with pytest.raises(KexaoneError, match="no split 'test'"):
        load_chat_dataset(dict_disk, split="test")


def test_missing_enable_thinking_defaults_to_reasoning_and_prompt_completion_joins():
    rows = [
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "completion": [{"role": "assistant", "content": "yo"}],
        },
        _conv("a", "b", tools=None),
    ]
    ds = load_chat_dataset(rows)
    assert ds[0]["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert ds[0]["enable_thinking"] is True


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"messages": [{"role": "user", "content": "q"}]}, r"line 2: has no assistant turn"),
        (
            _conv("q", "a") | {"messages": [{"role": "human", "content": "q"}]},
            r"line 2: messages\[0\]\.role is 'human'",
        ),
        (
            {"messages": [{"role": "user", "content": ["q"]}, {"role": "assistant", "content": "a"}]},
            "content must be",
        ),
        ({"text": "plain"}, r"line 2: missing field 'messages'"),
        (_conv("q", "a", enable_thinking="no"), r"line 2: field 'enable_thinking'"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(KexaoneError, match=message) as info:
        load_chat_dataset(path)
    assert "bad.jsonl" in str(info.value)


def test_bad_saved_dataset_rows_are_named(tmp_path):
    disk = tmp_path / "disk"
    datasets.Dataset.from_list([ROWS[0], {"messages": [{"role": "user", "content": "q"}]}]).save_to_disk(
        str(disk)
    )
    with pytest.raises(KexaoneError, match="disk row 1: has no assistant turn"):
        load_chat_dataset(disk)


def test_invalid_json_and_missing_paths(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{oops\n")
    with pytest.raises(KexaoneError, match=r"broken\.jsonl line 2: is not valid JSON"):
        load_chat_dataset(path)
    with pytest.raises(KexaoneError, match="does not exist"):
        load_chat_dataset(tmp_path / "nope.jsonl")


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(KexaoneError, match=r"'someone/chat-data'.*Hugging Face datasets cache"):
        load_chat_dataset("someone/chat-data")


def test_tokenize_masks_assistant_only_and_reports_truncation(caplog):
    rows = [_conv("q", "ab"), _conv("a long question " * 3, "x"), _conv("q", "a longer answer")]
    with caplog.at_level(logging.WARNING):
        out = tokenize_sft_rows(rows, tokenizer=None, max_seq_len=12, tokenize_fn=stand_in_tokenize)
    ids, mask = out[0]
    assert ids == [2, 10 + ord("q"), EOT, 3, 10 + ord("a"), 10 + ord("b"), EOT]
    assert mask == [0, 0, 0, 0, 1, 1, 1]
    # row 1: its question alone is longer than 12 tokens -> nothing to train on -> dropped
    # row 2: cut to 12 tokens, keeps the start of the answer
    assert out.truncated == [1, 2] and out.dropped == [1] and out.kept == [0, 2]
    assert len(out) == 2 and len(out[1][0]) == 12 and sum(out[1][1]) == 12 - 4
    assert "2 of 3 rows were longer than max_seq_len=12" in caplog.text


def test_tokenize_with_the_real_chat_format_and_tiny_tokenizer():
    from kexaone_align.data.tiny_tasks import generate_sft_rows
    from kexaone_align.models.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    rows = generate_sft_rows(20, 0, reasoning_fraction=0.5)
    out = tokenize_sft_rows(rows, tokenizer, max_seq_len=512)
    assert len(out) == 20 and not out.truncated
    for row, (ids, mask) in zip(rows, out, strict=True):
        trained = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
        reply = row["messages"][1]["content"]
        answer = reply.split("</think>")[-1].strip()
        assert trained.endswith(answer + "<|endofturn|>")
        assert ("<think>\n" + reply.split("</think>")[0].removeprefix("<think>").strip() in trained) == row[
            "enable_thinking"
        ]
        assert row["messages"][0]["content"] not in trained


def test_train_eval_split_is_seeded_and_disjoint():
    ds = load_chat_dataset([_conv(f"q{i}", f"a{i}") for i in range(50)])
    train, evals = train_eval_split(ds, 0.2, seed=0)
    assert (len(train), len(evals)) == (40, 10)
    key = lambda d: [r["messages"][0]["content"] for r in d]  # noqa: E731
    assert not set(key(train)) & set(key(evals))
    assert key(train_eval_split(ds, 0.2, seed=0)[1]) == key(evals)
    assert key(train_eval_split(ds, 0.2, seed=1)[1]) != key(evals)
    assert len(train_eval_split(ds, 0.0, seed=0)[1]) == 0
    with pytest.raises(KexaoneError, match="eval_fraction"):
        train_eval_split(ds, 1.0, seed=0)
    with pytest.raises(KexaoneError, match="too few"):
        train_eval_split(ds.select([0]), 0.5, seed=0)
