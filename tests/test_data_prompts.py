"""Prompt sets: validation that names the bad row, and a cursor that resumes in the same order."""

from __future__ import annotations

import json

import pytest

from kexaone_align.data.prompts import PromptCursor, PromptRow, load_prompt_set
from kexaone_align.errors import KexaoneError


def _rows(n: int) -> list[dict]:
    return [
        {
            "id": f"p{i}",
            "messages": [{"role": "user", "content": f"What is {i} + 1?"}],
            "task": "math",
            "reference": str(i + 1),
            "enable_thinking": i % 2 == 0,
        }
        for i in range(n)
    ]


def test_load_from_jsonl_keeps_fields_and_extra_keys(tmp_path):
    rows = _rows(3)
    rows[1]["source"] = "hand-written"
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    loaded = load_prompt_set(path)
    assert [r.id for r in loaded] == ["p0", "p1", "p2"]
    assert loaded[1] == PromptRow(
        id="p1",
        messages=rows[1]["messages"],
        task="math",
        reference="2",
        enable_thinking=False,
        metadata={"source": "hand-written"},
    )
    assert load_prompt_set(rows)[0].to_dict()["reference"] == "1"


def test_prompt_string_is_accepted_as_a_user_turn():
    (row,) = load_prompt_set([{"prompt": "hi", "task": "ifeval", "reference": {"instruction_id_list": []}}])
    assert row.messages == [{"role": "user", "content": "hi"}]
    assert row.enable_thinking is True and row.id == "row 0"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"task": None}, r"row 1: field 'task'"),
        ({"messages": []}, r"row 1: 'messages' must be a non-empty list"),
        ({"messages": [{"role": "bot", "content": "x"}]}, r"row 1: messages\[0\]\.role is 'bot'"),
        ({"messages": [{"role": "user", "content": 3}]}, r"row 1: messages\[0\]\.content must be a string"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            "assistant",
        ),
        ({"enable_thinking": "yes"}, r"row 1: field 'enable_thinking'"),
        ({"id": "p0"}, r"row 1: duplicate id 'p0'"),
    ],
)
def test_bad_rows_are_named(change, message):
    rows = _rows(3)
    rows[1].update(change)
    with pytest.raises(KexaoneError, match=message):
        load_prompt_set(rows)


def test_bad_files_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_rows(1)[0]) + "\n{not json\n")
    with pytest.raises(KexaoneError, match=r"bad\.jsonl line 2: is not valid JSON"):
        load_prompt_set(bad)
    with pytest.raises(KexaoneError, match="does not exist"):
        load_prompt_set(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(KexaoneError, match="empty"):
        load_prompt_set(empty)


def test_cursor_covers_each_epoch_once_in_a_seeded_order():
    rows = load_prompt_set(_rows(10))
    cursor = PromptCursor(rows, seed=1)
    first = [r.id for r in cursor.next_batch(10)]
    second = [r.id for r in cursor.next_batch(10)]
    assert sorted(first) == sorted(second) == sorted(r.id for r in rows)
    assert first != second  # reshuffled per epoch
    assert first != [r.id for r in rows]
    assert [r.id for r in PromptCursor(rows, seed=1).next_batch(10)] == first
    assert [r.id for r in PromptCursor(rows, seed=2).next_batch(10)] != first
    assert [r.id for r in PromptCursor(rows, shuffle=False).next_batch(12)][:3] == ["p0", "p1", "p2"]


def test_cursor_resumes_mid_epoch_after_a_json_round_trip():
    rows = load_prompt_set(_rows(7))
    reference = PromptCursor(rows, seed=3)
    expected = [r.id for r in reference.next_batch(25)]

    cursor = PromptCursor(rows, seed=3)
    seen = [r.id for r in cursor.next_batch(11)]  # crosses an epoch boundary
    state = json.loads(json.dumps(cursor.state_dict()))
    resumed = PromptCursor(rows, seed=0)  # seed comes from the state
    resumed.load_state_dict(state)
    seen += [r.id for r in resumed.next_batch(14)]
    assert seen == expected


def test_cursor_refuses_a_state_for_another_set():
    cursor = PromptCursor(load_prompt_set(_rows(5)), seed=0)
    state = cursor.state_dict()
    other = PromptCursor(load_prompt_set(_rows(6)), seed=0)
    with pytest.raises(KexaoneError, match="saved for 5 prompts"):
        other.load_state_dict(state)
    with pytest.raises(KexaoneError, match="missing"):
        other.load_state_dict({"epoch": 0})
    with pytest.raises(KexaoneError, match="batch_size"):
        cursor.next_batch(0)


def test_a_list_of_files_is_one_prompt_set_with_unique_ids(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    rows = _rows(5)
    a.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    b.write_text("".join(json.dumps(r) + "\n" for r in rows[3:]))
    assert [r.id for r in load_prompt_set([a, str(b)])] == ["p0", "p1", "p2", "p3", "p4"]
    with pytest.raises(
        KexaoneError, match=r"a\.jsonl line 1: duplicate id 'p0' \(first used at a\.jsonl line 1\)"
    ):
        load_prompt_set([a, a])
