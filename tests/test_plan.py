"""`plan`: parameter counts on the meta device and the per-GPU memory estimate."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from kexaone_align import cli
from kexaone_align.config import load_recipe
from kexaone_align.errors import KexaoneError
from kexaone_align.plan import hf_config, plan_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny"
BIG = ROOT / "recipes" / "k-exaone-236b"


def analytic_counts(cfg) -> tuple[int, int]:
    """Total and active parameters written out by hand from the EXAONE-MoE layer shapes."""
    h, v, d = cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    nq, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    e, k, ie, s = cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.num_shared_experts
    attn = h * nq * d + 2 * h * nkv * d + nq * d * h + 2 * d + 2 * h  # q,k,v,o + q/k norms + 2 layer norms
    dense = 3 * h * cfg.intermediate_size
    router, shared, routed = e * h, 3 * h * ie * s, e * 3 * h * ie
    total = active = 2 * v * h + h  # embedding, untied lm_head, final norm
    for kind in cfg.mlp_layer_types:
        total += attn + (dense if kind == "dense" else router + shared + routed)
        active += attn + (dense if kind == "dense" else router + shared + routed * k // e)
    return total, active


@pytest.mark.slow
def test_plan_json_236b_subprocess() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kexaone_align", "plan", "recipes/k-exaone-236b/agapo.yaml", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert 234e9 < plan["total_params"] < 238e9  # "236B"
    assert 22.5e9 < plan["active_params"] < 24e9  # "23B active"
    expected = analytic_counts(hf_config(load_recipe(BIG / "agapo.yaml")))
    assert (plan["total_params"], plan["active_params"]) == expected
    mem = plan["per_gpu_memory_gib"]
    for key in ("weights", "gradients", "optimizer_states", "activations", "kv_cache", "peak"):
        assert mem[key] > 0
    # ZeRO-3 over 128 learners: bf16 weights and grads are 2 bytes/param / 128 each.
    assert mem["weights"] == pytest.approx(plan["total_params"] * 2 / 128 / 2**30, rel=1e-3)
    assert mem["optimizer_states"] == pytest.approx(plan["trainable_params"] * 12 / 128 / 2**30, rel=1e-3)
    assert mem["peak"] < 141  # the documented layout fits an H200-class GPU


def test_plan_tiny_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plan", str(TINY / "agapo.yaml"), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert 1e6 < plan["total_params"] < 10e6
    assert plan["active_params"] < plan["total_params"]
    cfg = hf_config(load_recipe(TINY / "agapo.yaml"))
    assert (plan["total_params"], plan["active_params"]) == analytic_counts(cfg)
    assert plan["trainable_params"] == plan["total_params"] - plan["router_params"]  # router frozen in RL
    assert set(plan["per_gpu_memory_gib"]) >= {
        "weights",
        "gradients",
        "optimizer_states",
        "activations",
        "kv_cache",
        "learner_total",
        "rollout_total",
        "peak",
    }


def test_plan_pipeline_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plan", str(TINY / "pipeline.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.count("parameters:") == 3 and "stage sft" in out and "stage grouper" in out


def test_zero_stage_and_data_parallel_split_memory() -> None:
    base = ["learners.num_learners=1", "learners.precision=bf16"]
    z2 = plan_recipe(load_recipe(TINY / "sft.yaml", [*base, "learners.zero_stage=2"]))["per_gpu_memory_gib"]
    z3 = plan_recipe(load_recipe(TINY / "sft.yaml", [*base, "learners.zero_stage=3"]))["per_gpu_memory_gib"]
    assert z2["weights"] == pytest.approx(z3["weights"], rel=1e-6)  # DP=1: nothing to shard
    cluster = ["cluster.gpus_per_node=4", "learners.backend=nccl"]
    z2 = plan_recipe(
        load_recipe(TINY / "sft.yaml", [*cluster, "learners.num_learners=4", "learners.zero_stage=2"])
    )
    z3 = plan_recipe(
        load_recipe(TINY / "sft.yaml", [*cluster, "learners.num_learners=4", "learners.zero_stage=3"])
    )
    m2, m3 = z2["per_gpu_memory_gib"], z3["per_gpu_memory_gib"]
    assert m3["weights"] == pytest.approx(m2["weights"] / 4, rel=1e-2)
    assert m3["optimizer_states"] == pytest.approx(m2["optimizer_states"], rel=1e-6)
    assert m3["zero3_live_params"] > 0 == m2["zero3_live_params"]
    fp32 = plan_recipe(load_recipe(TINY / "sft.yaml"))  # fp32: no master copy, 8 bytes/param of Adam state
    assert fp32["per_gpu_memory_gib"]["optimizer_states"] == pytest.approx(
        fp32["trainable_params"] * 8 / 2**30, abs=2e-3
    )


def test_gradient_checkpointing_reduces_activations() -> None:
    off = plan_recipe(load_recipe(TINY / "sft.yaml", ["model.gradient_checkpointing=false"]))
    on = plan_recipe(load_recipe(TINY / "sft.yaml", ["model.gradient_checkpointing=true"]))
    assert on["per_gpu_memory_gib"]["activations"] < off["per_gpu_memory_gib"]["activations"]


def test_kv_cache_caps_sliding_layers_and_splits_by_tp() -> None:
    recipe = load_recipe(TINY / "agapo.yaml", ["data.max_prompt_tokens=100", "rollout.max_new_tokens=156"])
    cfg = hf_config(recipe)
    seq = 256
    n_global = cfg.layer_types.count("full_attention")
    n_sliding = cfg.num_hidden_layers - n_global
    per_token = 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # K and V, fp32 tiny model
    expected = per_token * (n_global * seq + n_sliding * min(seq, cfg.sliding_window))
    plan = plan_recipe(recipe)
    assert plan["rollout"]["kv_cache_per_sequence_mib"] == pytest.approx(expected / 2**20, abs=1e-3)
    # Doubling the length doubles only the global layers' share.
    longer = plan_recipe(
        load_recipe(TINY / "agapo.yaml", ["data.max_prompt_tokens=100", "rollout.max_new_tokens=412"])
    )
    grown = per_token * n_global * seq
    assert longer["rollout"]["kv_cache_per_sequence_mib"] == pytest.approx(
        (expected + grown) / 2**20, abs=1e-3
    )
    big = load_recipe(BIG / "agapo.yaml")
    tp8 = plan_recipe(big)["rollout"]["kv_cache_per_sequence_mib"]
    tp4 = plan_recipe(load_recipe(BIG / "agapo.yaml", ["rollout.tensor_parallel_size=4"]))
    assert tp4["rollout"]["kv_cache_per_sequence_mib"] == pytest.approx(2 * tp8)
    assert math.isclose(
        tp4["per_gpu_memory_gib"]["rollout_weights"],
        2 * plan_recipe(big)["per_gpu_memory_gib"]["rollout_weights"],
        rel_tol=1e-6,
    )


def test_plan_from_local_config_json(tmp_path: Path) -> None:
    recipe = load_recipe(TINY / "agapo.yaml")
    hf_config(recipe).save_pretrained(tmp_path)
    local = load_recipe(
        TINY / "agapo.yaml", ["model.source=pretrained", f"model.path={tmp_path}", "model.architecture=null"]
    )
    assert plan_recipe(local)["total_params"] == plan_recipe(recipe)["total_params"]


def test_plan_without_architecture_offline_is_a_clear_error() -> None:
    recipe = load_recipe(BIG / "agapo.yaml", ["model.architecture=null"])
    with pytest.raises(KexaoneError, match=r"model\.architecture"):
        plan_recipe(recipe)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_activation_formula_matches_saved_tensors(dtype: str) -> None:
    """The activation estimate is within 15% of what autograd really saves for a small ExaoneMoe."""
    import torch
    from transformers import ExaoneMoeConfig, ExaoneMoeForCausalLM

    from kexaone_align.plan import _activation_bytes_per_token

    cfg = ExaoneMoeConfig(
        vocab_size=512,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=1024,
        moe_intermediate_size=128,
        num_experts=16,
        num_experts_per_tok=4,
        num_shared_experts=1,
        first_k_dense_replace=1,
        sliding_window=64,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = ExaoneMoeForCausalLM(cfg).to(getattr(torch, dtype))
    tokens = 256
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=torch.randint(0, 512, (1, tokens)))
    measured = sum(saved.values()) / tokens
    estimate, _, _ = _activation_bytes_per_token(cfg, 2 if dtype == "bfloat16" else 4)
    assert estimate == pytest.approx(measured, rel=0.15)


def test_plan_counts_log_prob_head_host_memory_and_group_cache_236b() -> None:
    """The terms beyond weights/optimizer/activations, by hand for the 236B numbers (V=153600, H=6144,
    bf16 learners: the fp32 results of the log-prob head are cast back to bf16, 2 more bytes)."""
    v, h = 153_600, 6144
    plan = plan_recipe(load_recipe(BIG / "grouper.yaml"))
    mem = plan["per_gpu_memory_gib"]
    assert mem["lm_head_grad"] == pytest.approx(v * h * (4 + 2) / 2**30, abs=1e-5)  # 5.27 GiB per learner
    assert mem["logprob_chunk"] == pytest.approx(1024 * v * (4 + 2) / 2**30, abs=1e-5)  # 0.88 GiB
    parts = ("weights", "zero3_live_params", "gradients", "optimizer_states", "activations")
    total = sum(mem[k] for k in parts) + mem["lm_head_grad"] + mem["logprob_chunk"]
    assert mem["learner_total"] == pytest.approx(total, abs=1e-4)
    # One bf16 policy copy kept in Ray's object store for replacing rollout workers (max_worker_restarts 3).
    params = plan["total_params"]
    assert plan["host_memory_gib"] == {"kept_rollout_weights": pytest.approx(params * 2 / 2**30, abs=1e-5)}
    # 500 steps x 256 prompts, G=8 responses of up to 16384 tokens (id + log-prob), 4096-token prompt once.
    assert plan["disk_gib"] == {"group_cache": pytest.approx(500 * 256 * (8 * 16384 * 8 + 4096 * 4) / 2**30)}
    evals = plan_recipe(load_recipe(BIG / "grouper.yaml", ["grouper.eval_every_steps=50"]))
    assert evals["host_memory_gib"]["grouper_initial_policy"] == pytest.approx(params * 2 / 2**30, abs=1e-5)
    bare = plan_recipe(load_recipe(BIG / "agapo.yaml", ["rollout.max_worker_restarts=0"]))
    assert bare["host_memory_gib"] == {} and bare["disk_gib"] == {}
    assert plan_recipe(load_recipe(BIG / "sft.yaml"))["host_memory_gib"] == {}


def test_log_prob_head_terms_follow_the_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan's lm_head_grad assumes an fp32 [V, H] accumulator whatever the weight dtype, and the
    chunk size the learner uses; fp32 learners need no cast copy."""
    import dataclasses

    import torch

    from kexaone_align.algorithms.logprobs import chunked_token_logprobs
    from kexaone_align.plan import LOGPROB_CHUNK
    from kexaone_align.runtime.learner import LearnerConfig

    default = {f.name: f.default for f in dataclasses.fields(LearnerConfig)}["logprob_chunk_size"]
    assert default == LOGPROB_CHUNK
    made: list[tuple[tuple[int, ...], torch.dtype]] = []
    zeros = torch.zeros

    def spy(*args, **kwargs):
        out = zeros(*args, **kwargs)
        made.append((tuple(out.shape), out.dtype))
        return out

    hidden = torch.randn(10, 16, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(40, 16, dtype=torch.bfloat16, requires_grad=True)
    out = chunked_token_logprobs(hidden, weight, torch.randint(0, 40, (10,)), chunk_size=4)
    monkeypatch.setattr(torch, "zeros", spy)
    out.sum().backward()
    assert ((40, 16), torch.float32) in made and weight.grad.dtype == torch.bfloat16
    tiny = plan_recipe(load_recipe(TINY / "agapo.yaml"))  # fp32 learners
    cfg = hf_config(load_recipe(TINY / "agapo.yaml"))
    assert tiny["per_gpu_memory_gib"]["lm_head_grad"] == pytest.approx(
        cfg.vocab_size * cfg.hidden_size * 4 / 2**30, abs=1e-6
    )
