"""Packing: rows are laid out right, and through a real ExaoneMoe model packed samples see only themselves."""

from __future__ import annotations

import pytest
import torch
from transformers import ExaoneMoeConfig, ExaoneMoeForCausalLM

from kexaone_align.data.packing import (
    IGNORE_INDEX,
    block_diagonal_attention_mask,
    collate_packed,
    pack_sequences,
    packed_forward_kwargs,
)
from kexaone_align.errors import KexaoneError

VOCAB = 64
WINDOW = 4


def _examples(lengths: list[int], seed: int = 0) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        # prompt tokens untrained, answer tokens trained (like SFT rows)
        mask = [0] * (n // 2) + [1] * (n - n // 2)
        out.append((ids, mask))
    return out


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request) -> ExaoneMoeForCausalLM:
    torch.manual_seed(0)
    config = ExaoneMoeConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        sliding_window=WINDOW,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config._attn_implementation = request.param
    m = ExaoneMoeForCausalLM(config).eval()
    # The router init is tiny; make routing depend on the token so MoE layers matter in the comparison.
    with torch.no_grad():
        for layer in m.model.layers[1:]:
            layer.mlp.gate.weight.normal_(0, 1.0)
    return m


def _mask_dtype(model) -> torch.dtype:
    return torch.bool if model.config._attn_implementation == "sdpa" else torch.float32


def _alone_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def _check_against_alone(model, rows, examples, logits) -> float:
    worst = 0.0
    for b, row in enumerate(rows):
        for (start, end), idx in zip(row.boundaries, row.example_indices, strict=True):
            ref = _alone_logits(model, examples[idx][0])
            worst = max(worst, (logits[b, start:end] - ref).abs().max().item())
    return worst


def test_pack_layout_positions_restart_and_first_token_untrained():
    examples = _examples([5, 3, 7, 2, 6])
    rows = pack_sequences(examples, max_tokens=10)
    seen = sorted(i for r in rows for i in r.example_indices)
    assert seen == [0, 1, 2, 3, 4]
    for row in rows:
        assert row.num_tokens <= 10
        for k, ((start, end), idx) in enumerate(zip(row.boundaries, row.example_indices, strict=True)):
            ids, mask = examples[idx]
            assert row.input_ids[start:end].tolist() == ids
            assert row.position_ids[start:end].tolist() == list(range(len(ids)))
            assert (row.sequence_ids[start:end] == k).all()
            assert row.loss_mask[start] == 0
            assert row.loss_mask[start + 1 : end].tolist() == mask[1:]


def test_first_fit_decreasing_fills_rows():
    rows = pack_sequences(_examples([6, 4, 5, 5, 3, 7]), max_tokens=10)
    assert len(rows) == 3  # 30 tokens in rows of 10: a perfect fit exists and FFD finds it
    assert [r.num_tokens for r in rows] == [10, 10, 10]


def test_pack_rejects_too_long_and_mismatched():
    with pytest.raises(KexaoneError, match="example 1 has 12 tokens"):
        pack_sequences(_examples([3, 12]), max_tokens=10)
    with pytest.raises(KexaoneError, match="example 0 has 3 input_ids but 2"):
        pack_sequences([([1, 2, 3], [0, 1])], max_tokens=10)


def test_targets_never_cross_a_boundary():
    # Every token trained, so only the boundary rule can zero a target.
    examples = [([5, 6, 7], [1, 1, 1]), ([8, 9], [1, 1]), ([10, 11, 12, 13], [1, 1, 1, 1])]
    rows = pack_sequences(examples, max_tokens=16, sort_by_length=False)
    batch = collate_packed(rows, pad_to_multiple_of=8)
    assert batch["input_ids"].shape == (1, 16)
    starts = [s for s, _ in rows[0].boundaries]
    for s in starts:
        assert batch["loss_mask"][0, s] == 0
        assert batch["labels"][0, s] == IGNORE_INDEX
        if s > 0:
            assert batch["target_mask"][0, s - 1] == 0  # last token of previous sample predicts nothing
    # inside a sample every next token is a target; padding never is
    assert batch["target_mask"][0].tolist()[:9] == [1, 1, 0, 1, 0, 1, 1, 1, 0]
    assert batch["target_mask"][0, 9:].sum() == 0 and batch["loss_mask"][0, 9:].sum() == 0
    assert batch["target_ids"][0, 0] == 6 and batch["target_ids"][0, 3] == 9


def test_block_diagonal_mask_shape_and_window():
    seq = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    m = block_diagonal_attention_mask(seq)
    assert m.shape == (1, 1, 7, 7) and m.dtype == torch.bool
    assert m[0, 0, 2, :3].all() and not m[0, 0, 3, :3].any() and m[0, 0, 6, 3:].all()
    assert not m[0, 0, 1, 2]  # causal
    w = block_diagonal_attention_mask(seq, sliding_window=2)
    assert w[0, 0, 6].tolist() == [False] * 5 + [True, True]
    add = block_diagonal_attention_mask(seq, dtype=torch.float32)
    assert add[0, 0, 3, 2] == torch.finfo(torch.float32).min and add[0, 0, 3, 3] == 0


def test_packed_logits_equal_alone_via_position_ids(model):
    # Samples longer than the sliding window, so the window matters inside each sample.
    examples = _examples([9, 6, 11, 5, 8, 3], seed=1)
    rows = pack_sequences(examples, max_tokens=24)
    assert any(len(r.boundaries) > 1 for r in rows)
    batch = collate_packed(rows)
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
    assert _check_against_alone(model, rows, examples, logits) < 1e-5


def test_packed_logits_equal_alone_via_explicit_masks(model):
    examples = _examples([9, 6, 11, 5, 8, 3], seed=2)
    rows = pack_sequences(examples, max_tokens=24)
    batch = collate_packed(rows)
    kwargs = packed_forward_kwargs(batch, model.config)
    masks = kwargs["attention_mask"]
    assert set(masks) == {"full_attention", "sliding_attention"}
    assert masks["full_attention"].dtype == _mask_dtype(model)
    with torch.no_grad():
        logits = model(**kwargs).logits
    assert _check_against_alone(model, rows, examples, logits) < 1e-5
    model.train()  # dropout is 0: train mode (where a cache is still created by default) must agree too
    try:
        with torch.no_grad():
            train_logits = model(**kwargs).logits
    finally:
        model.eval()
    assert _check_against_alone(model, rows, examples, train_logits) < 1e-5


def test_naive_packing_leaks(model):
    examples = _examples([9, 6, 11, 5, 8, 3], seed=3)
    rows = pack_sequences(examples, max_tokens=24)
    batch = collate_packed(rows)
    with torch.no_grad():
        # what a plain concatenation does: one causal sequence, positions 0..T-1, no mask
        naive = model(input_ids=batch["input_ids"]).logits
        # the explicit mask without the sliding window also differs (full mask on sliding layers)
        full_only = block_diagonal_attention_mask(batch["sequence_ids"], dtype=_mask_dtype(model))
        no_window = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=full_only
        ).logits
    assert _check_against_alone(model, rows, examples, naive) > 1e-3
    assert _check_against_alone(model, rows, examples, no_window) > 1e-3


def test_packed_loss_equals_the_loss_of_samples_run_alone(model):
    examples = _examples([9, 6, 11, 5, 8, 3], seed=4)
    rows = pack_sequences(examples, max_tokens=24)
    batch = collate_packed(rows)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in examples:
            labels = torch.tensor([[t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]])
            labels[0, 0] = IGNORE_INDEX
            n = int((labels[0, 1:] != IGNORE_INDEX).sum())
            total += model(input_ids=torch.tensor([ids]), labels=labels).loss.item() * n
            count += n
        packed = model(**packed_forward_kwargs(batch, model.config), labels=batch["labels"])
        # the same number through the shifted targets a custom learner would use
        logp = torch.log_softmax(packed.logits.float(), dim=-1)
        token_logp = logp.gather(-1, batch["target_ids"].unsqueeze(-1)).squeeze(-1)
        shifted = -(token_logp * batch["target_mask"]).sum() / batch["target_mask"].sum()
    assert int(batch["target_mask"].sum()) == count
    assert packed.loss.item() == pytest.approx(total / count, abs=1e-5)
    assert shifted.item() == pytest.approx(total / count, abs=1e-5)


def test_forward_kwargs_for_flash_attention_rely_on_position_restarts():
    from types import SimpleNamespace

    rows = pack_sequences(_examples([3, 4]), max_tokens=8)
    batch = collate_packed(rows)
    config = SimpleNamespace(_attn_implementation="flash_attention_2", layer_types=["full_attention"])
    kwargs = packed_forward_kwargs(batch, config)
    assert "attention_mask" not in kwargs and kwargs["use_cache"] is False
    assert kwargs["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]
