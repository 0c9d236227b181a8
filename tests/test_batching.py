import pytest
import torch

from kexaone_align.errors import KexaoneError
from kexaone_align.runtime.batching import (
    balanced_shard_rows,
    collate,
    micro_batches,
    pad_sequences,
    plan_micro_batches,
    shard_batch,
    shard_rows,
    split_by_token_budget,
    validate_batch,
)


def test_split_respects_budget_and_order():
    lengths = [3, 4, 2, 8, 1, 1, 5]
    groups = split_by_token_budget(lengths, budget=8)
    assert [i for g in groups for i in g] == list(range(len(lengths)))
    for g in groups:
        assert len(g) * max(lengths[i] for i in g) <= 8
    assert groups == [[0, 1], [2], [3], [4, 5], [6]]


def test_long_sequence_gets_its_own_micro_batch():
    assert split_by_token_budget([2, 50, 2, 2], budget=10) == [[0], [1], [2, 3]]
    assert split_by_token_budget([], budget=4) == []


def test_split_rejects_bad_input():
    with pytest.raises(KexaoneError):
        split_by_token_budget([1, 2], budget=0)
    with pytest.raises(KexaoneError):
        split_by_token_budget([1, -2], budget=4)


def test_pad_and_collate():
    assert pad_sequences([[1, 2, 3], [4]], 0).tolist() == [[1, 2, 3], [4, 0, 0]]
    assert pad_sequences([[1, 2, 3], [4]], 9, left=True).tolist() == [[1, 2, 3], [9, 9, 4]]
    b = collate([[5, 6, 7], [8, 9]], [[0, 1, 1], [0, 1]], pad_token_id=0)
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["loss_mask"].tolist() == [[0, 1, 1], [0, 1, 0]]
    with pytest.raises(KexaoneError):
        collate([[1, 2]], [[1]])


def test_micro_batches_are_trimmed_and_keep_extras():
    b = collate([[1, 2], [3, 4, 5, 6, 7, 8], [9]], [[0, 1], [0, 1, 1, 1, 1, 1], [1]])
    b["advantages"] = torch.tensor([0.1, 0.2, 0.3])
    mbs = micro_batches(b, budget=6)
    assert [m["input_ids"].shape for m in mbs] == [torch.Size([1, 2]), torch.Size([1, 6]), torch.Size([1, 1])]
    assert mbs[2]["advantages"].tolist() == pytest.approx([0.3])
    plan = plan_micro_batches(b["attention_mask"], budget=12)
    assert [(p.rows, p.start, p.stop) for p in plan] == [((0, 1), 0, 6), ((2,), 0, 1)]


def test_left_padding_is_trimmed_from_the_left():
    ids = pad_sequences([[1, 2], [3]], 0, left=True)
    b = {"input_ids": torch.cat([torch.zeros(2, 2, dtype=torch.long), ids], 1)}
    b["attention_mask"] = (b["input_ids"] > 0).long()
    b["loss_mask"] = b["attention_mask"].clone()
    (m,) = micro_batches(b, budget=100)
    assert m["input_ids"].tolist() == [[1, 2], [0, 3]]


def test_shard_batch_splits_rows():
    b = collate([[1], [2], [3]], [[1], [1], [1]])
    shards = shard_batch(b, 2)
    assert [s["input_ids"].flatten().tolist() for s in shards] == [[1, 2], [3]]
    assert shard_batch(b, 4)[3]["input_ids"].shape[0] == 0


def test_validate_batch_names_the_problem():
    with pytest.raises(KexaoneError, match="loss_mask"):
        validate_batch({"input_ids": torch.zeros(2, 3), "attention_mask": torch.zeros(2, 3)})
    with pytest.raises(KexaoneError, match="shape"):
        validate_batch(
            {
                "input_ids": torch.zeros(2, 3),
                "attention_mask": torch.zeros(2, 3),
                "loss_mask": torch.zeros(2, 4),
            }
        )


def test_balanced_shards_split_tokens_evenly_and_deterministically():
    lengths = [100, 3, 4, 90, 2, 5, 80, 6, 1, 7]
    plan = balanced_shard_rows(lengths, 2)
    assert sorted(i for rows in plan for i in rows) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in rows) for rows in plan]
    assert max(loads) - min(loads) <= max(lengths)  # greedy longest-first's guarantee
    assert balanced_shard_rows([5, 5, 4, 3, 3], 2) == [[0, 2], [1, 3, 4]]  # 9 / 11 tokens
    contiguous = [sum(lengths[i] for i in rows) for rows in shard_rows(len(lengths), 2)]
    assert max(loads) < max(contiguous)  # the long rows no longer land on one rank
    assert plan == balanced_shard_rows(lengths, 2)
    assert all(rows == sorted(rows) for rows in plan)
    assert balanced_shard_rows([5], 3) == [[0], [], []]
    with pytest.raises(KexaoneError):
        balanced_shard_rows([1], 0)


def test_balanced_shard_batch_trims_each_shard_to_its_columns():
    b = collate([[1, 2, 3, 4, 5, 6], [7], [8, 9], [3]], [[1] * 6, [1], [1, 1], [1]])
    shards = shard_batch(b, 2, balance=True)
    assert [s["input_ids"].tolist() for s in shards] == [[[1, 2, 3, 4, 5, 6]], [[7, 0], [8, 9], [3, 0]]]
    assert [s["input_ids"].shape[0] for s in shard_batch(b, 2)] == [2, 2]
