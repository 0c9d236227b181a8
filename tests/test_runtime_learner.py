"""The DeepSpeed learner on CPU: in-process (world size 1) and as Ray actors (data parallel)."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import sys

import pytest
import torch
from ray import cloudpickle

from kexaone_align.algorithms.sft import sft_loss
from kexaone_align.errors import KexaoneError
from kexaone_align.runtime.batching import collate
from kexaone_align.runtime.learner import Learner, LearnerConfig

# Ray actors cannot import this test module, so its loss functions travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

SMALL = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "layer_types": ["sliding_attention", "full_attention"],
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "head_dim": 16,
}
ZERO3_SHARDED = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}


def sft_loss_fn(token_logprobs, batch):
    """SFT-style loss: mean negative log-prob over loss_mask tokens."""
    return sft_loss(token_logprobs, batch["loss_mask"]), {"tokens": batch["loss_mask"].sum()}


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from kexaone_align.models import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "policy", seed=0, architecture=SMALL)


def make_batch(seed=0, lengths=(7, 12, 5, 9, 11, 4)):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(5, 500, (n,), generator=g).tolist() for n in lengths]
    return collate(ids, [[0, 0] + [1] * (len(x) - 2) for x in ids])


def config(stage=2, **kw):
    base = {"zero_stage": stage, "lr": 1e-2, "micro_batch_tokens": 24, "grad_clip": 1.0}
    if stage == 3:
        base["ds_config_overrides"] = ZERO3_SHARDED
    base.update(kw)
    return LearnerConfig(**base)


def full_state(learner_or_group, bucket_bytes=1 << 30):
    out = {}
    for bucket in learner_or_group.state_dict_stream(bucket_bytes):
        out.update(bucket)
    return out


@pytest.fixture(scope="module")
def learner(tiny_path):
    lrn = Learner(tiny_path, config(2))
    lrn.setup()
    return lrn


def test_config_rejects_bad_values():
    with pytest.raises(KexaoneError, match="zero_stage"):
        LearnerConfig(zero_stage=1).validate()
    with pytest.raises(KexaoneError, match="lr_schedule"):
        Learner("x", LearnerConfig(lr_schedule="linear"))


def test_train_steps_change_weights_lower_loss_and_keep_router(learner, tiny_path):
    from transformers import AutoModelForCausalLM

    batch = make_batch()
    before = full_state(learner)
    original = AutoModelForCausalLM.from_pretrained(tiny_path).state_dict()
    assert all(torch.equal(before[k], original[k]) for k in original)  # stream == checkpoint
    losses = [learner.train_step(batch, sft_loss_fn) for _ in range(4)]
    assert losses[-1]["loss"] < losses[0]["loss"] - 0.5
    m = losses[0]
    assert m["micro_batches"] >= 2 and m["learner_tokens"] == batch["attention_mask"].sum()
    assert m["grad_norm"] > 0 and m["lr"] == pytest.approx(1e-2) and m["tokens_per_s"] > 0
    assert m["loss/tokens"] > 0
    after = full_state(learner)
    routers = [k for k in after if k.endswith("mlp.gate.weight")]
    assert routers and set(learner.frozen_parameters) == set(routers)
    for k in after:
        changed = not torch.equal(before[k], after[k])
        assert changed == (k not in routers and "e_score_correction_bias" not in k), k


def test_forward_logprobs_matches_transformers(learner, tmp_path):
    from transformers import AutoModelForCausalLM

    batch = make_batch(seed=3)
    lp = learner.forward_logprobs(batch)
    learner.export_hf(tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    mask = batch["loss_mask"][:, 1:].bool()
    assert torch.allclose(lp[:, 1:][mask], ref[mask], atol=1e-4)
    assert (lp[:, 1:][~mask] == 0).all() and (lp[:, 0] == 0).all()


def test_export_hf_reloads_with_same_weights_and_tokenizer(learner, tiny_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    learner.export_hf(tmp_path / "hf", tokenizer_path=tiny_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    state = full_state(learner)
    reloaded = model.state_dict()
    assert set(reloaded) == set(state)
    assert all(torch.equal(reloaded[k], state[k]) for k in state)
    assert len(AutoTokenizer.from_pretrained(tmp_path / "hf")) == len(
        AutoTokenizer.from_pretrained(tiny_path)
    )


def test_save_load_gives_same_next_step(learner, tmp_path):
    batch = make_batch(seed=5)
    learner.train_step(batch, sft_loss_fn)  # optimizer state is non-trivial
    learner.save(tmp_path / "ckpt")
    saved = full_state(learner)
    first = learner.train_step(batch, sft_loss_fn)
    after_first = full_state(learner)
    learner.load(tmp_path / "ckpt")
    assert all(torch.equal(saved[k], v) for k, v in full_state(learner).items())
    second = learner.train_step(batch, sft_loss_fn)
    assert second["loss"] == pytest.approx(first["loss"], abs=1e-6)
    assert second["lr"] == first["lr"]
    assert all(torch.allclose(after_first[k], v, atol=1e-6) for k, v in full_state(learner).items())
    with pytest.raises(KexaoneError):
        learner.load(tmp_path / "nowhere")


def test_aux_loss_is_reported_and_trains(tiny_path):
    lrn = Learner(tiny_path, config(2, aux_loss_coef=0.01, freeze_router=False))
    lrn.setup()
    m = lrn.train_step(make_batch(), sft_loss_fn)
    assert m["aux_loss"] > 0 and m["loss"] > 0


# ---------------------------------------------------------------------------- Ray: data parallel
@pytest.fixture(scope="module")
def ray_session():
    import ray

    from kexaone_align.runtime.cluster import init_ray

    init_ray(None, num_cpus=4)
    yield ray
    ray.shutdown()


def _reference(tiny_path, stage, batch, steps):
    lrn = Learner(tiny_path, config(stage))
    lrn.setup()
    metrics = [lrn.train_step(batch, sft_loss_fn) for _ in range(steps)]
    return lrn, metrics


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_learners_match_one(ray_session, tiny_path, stage, tmp_path):
    from kexaone_align.runtime.cluster import LearnerResources, create_learner_group

    batch = make_batch(seed=7, lengths=(12, 3, 4, 5, 11, 10, 2))  # ranks get different micro-batch counts
    ref, ref_metrics = _reference(tiny_path, stage, batch, steps=2)
    group = create_learner_group(2, tiny_path, config(stage), "disaggregated", LearnerResources(num_cpus=1))
    try:
        metrics = [group.train_step(batch, sft_loss_fn) for _ in range(2)]
        for a, b in zip(metrics, ref_metrics, strict=True):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
            assert a["learner_tokens"] == b["learner_tokens"]
        want = full_state(ref)
        got = full_state(group, bucket_bytes=64 * 1024)
        assert list(got) == list(want)
        for k in want:
            # Adam turns fp noise in near-zero gradients into updates of up to lr; the bulk must agree.
            diff = (got[k] - want[k]).abs()
            assert diff.max() < 2e-4 and diff.mean() < 1e-6, (k, diff.max(), diff.mean())
        lp = group.forward_logprobs(batch)
        assert torch.allclose(lp, ref.forward_logprobs(batch), atol=1e-5)
        if stage == 3:
            limit = 64 * 1024
            sizes = [sum(t.numel() * t.element_size() for _, t in b) for b in group.state_dict_stream(limit)]
            singles = [len(b) for b in group.state_dict_stream(limit)]
            assert len(sizes) > 3
            assert all(s <= limit or n == 1 for s, n in zip(sizes, singles, strict=True))
            # export gathers the sharded weights; save/load restores every rank's shard
            from transformers import AutoModelForCausalLM

            group.export_hf(tmp_path / "hf")
            exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
            assert all(torch.equal(exported[k], got[k]) for k in got)
            group.save(tmp_path / "ckpt")
            group.train_step(batch, sft_loss_fn)
            assert group.load(tmp_path / "ckpt") == 2
            restored = full_state(group)
            assert all(torch.equal(restored[k], got[k]) for k in got)
    finally:
        group.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_zero3_learners_agree_when_ranks_route_to_different_experts(ray_session, tiny_path):
    """With the eager experts loop the modules run inside an MoE block depend on each rank's tokens.

    Without leaf blocks DeepSpeed saw a different submodule order per rank ("disagreement on list
    length", or a hang in a stage run); short rows make the ranks' expert hits differ at once.
    """
    from kexaone_align.runtime.cluster import LearnerResources, create_learner_group

    batch = make_batch(seed=3, lengths=(3, 2, 4, 2, 3, 2, 2, 3))
    cfg = config(3, experts_implementation="eager", micro_batch_tokens=6)
    ref = Learner(tiny_path, cfg)
    ref.setup()
    ref_losses = [ref.train_step(batch, sft_loss_fn)["loss"] for _ in range(3)]
    group = create_learner_group(2, tiny_path, cfg, "disaggregated", LearnerResources(num_cpus=1))
    try:
        losses = [group.train_step(batch, sft_loss_fn)["loss"] for _ in range(3)]
    finally:
        group.shutdown()
    assert losses == pytest.approx(ref_losses, abs=1e-5)
    assert losses[-1] < losses[0]


def test_zero3_checkpointed_gradient_matches_plain_torch(tiny_path):
    """Loss and pre-clip gradient norm of one micro-batched ZeRO-3 step == one full-batch torch backward."""
    from transformers import AutoModelForCausalLM

    from kexaone_align.models import freeze_router

    batch = make_batch(seed=11)
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    freeze_router(model)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    loss = sft_loss(lp, batch["loss_mask"][:, 1:])
    loss.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))

    lrn = Learner(tiny_path, config(3, gradient_checkpointing=True, micro_batch_tokens=20))
    lrn.setup()
    m = lrn.train_step(batch, sft_loss_fn)
    assert m["micro_batches"] >= 3
    assert m["loss"] == pytest.approx(loss.item(), abs=1e-5)
    assert m["grad_norm"] == pytest.approx(norm.item(), rel=1e-4)


def test_empty_shard_still_steps(learner):
    batch = make_batch()
    empty = {k: v[:0] for k, v in batch.items()}
    m = learner.train_step(empty, sft_loss_fn)
    assert m["learner_tokens"] == 0 and m["micro_batches"] == 0 and m["loss"] == 0


def test_lr_schedule_reaches_the_engine(tiny_path):
    lrn = Learner(
        tiny_path, config(2, lr=1e-3, lr_schedule="wsd", warmup_steps=2, stable_steps=0, decay_steps=2)
    )
    lrn.setup()
    lrs = [lrn.train_step(make_batch(), sft_loss_fn)["lr"] for _ in range(4)]
    assert lrs == pytest.approx([5e-4, 1e-3, 5e-4, 0.0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_nccl_learner_on_gpu(ray_session, tiny_path):
    from kexaone_align.runtime.cluster import LearnerResources, create_learner_group

    # a fresh actor process: this test process already holds a gloo group from the CPU tests
    cfg = config(3, precision="bf16", backend="nccl", ds_config_overrides={})
    group = create_learner_group(1, tiny_path, cfg, "disaggregated", LearnerResources(num_cpus=1, num_gpus=1))
    try:
        losses = [group.train_step(make_batch(), sft_loss_fn)["loss"] for _ in range(3)]
        assert losses[-1] < losses[0]
        state = full_state(group)
        assert state["lm_head.weight"].dtype == torch.bfloat16
    finally:
        group.shutdown()
