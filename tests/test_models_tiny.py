"""The tiny K-EXAONE checkpoint: K-EXAONE's shape, loads like a real checkpoint, trains on CPU in seconds."""

import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, ExaoneMoeForCausalLM

from kexaone_align.errors import KexaoneError
from kexaone_align.models import (
    build_tiny_checkpoint,
    count_parameters,
    load_policy,
    load_tokenizer,
    tiny_config,
)
from kexaone_align.models.loading import _check_source
from kexaone_align.models.tokenizer import CHAT_TEMPLATE


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0)


def test_config_keeps_k_exaone_shape():
    cfg = tiny_config(1024)
    assert cfg.model_type == "exaone_moe"
    assert cfg.layer_types == (["sliding_attention"] * 3 + ["full_attention"]) * 2
    assert cfg.sliding_window is not None  # ExaoneMoe skips RoPE on full-attention layers only then (NoPE)
    assert cfg.mlp_layer_types[0] == "dense" and set(cfg.mlp_layer_types[1:]) == {"sparse"}
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.num_shared_experts) == (8, 2, 1)
    assert cfg.num_attention_heads > cfg.num_key_value_heads  # GQA
    deeper = tiny_config(1024, num_hidden_layers=12)
    assert deeper.layer_types.count("full_attention") == 3 and deeper.layer_types[-1] == "full_attention"


def test_config_rejects_bad_input():
    with pytest.raises(KexaoneError, match="vocab_size"):
        tiny_config(0)
    with pytest.raises(KexaoneError, match="layer_types"):
        tiny_config(1024, layer_types=["full_attention"])
    with pytest.raises(KexaoneError, match="num_experts_per_tok"):
        tiny_config(1024, num_experts_per_tok=9)


def test_architecture_overrides(tmp_path):
    arch = {"num_hidden_layers": 4, "hidden_size": 64, "vocab_size": 2048, "eos_token_id": 999}
    model = load_policy(build_tiny_checkpoint(tmp_path / "small", architecture=arch))
    assert model.config.num_hidden_layers == 4 and model.config.hidden_size == 64
    assert model.config.vocab_size == 2048  # padded beyond the tokenizer
    # Special token ids always follow the tokenizer saved next to the model.
    assert model.config.eos_token_id == load_tokenizer(tmp_path / "small").eos_token_id
    with pytest.raises(KexaoneError, match="smaller than the tiny tokenizer"):
        build_tiny_checkpoint(tmp_path / "bad", architecture={"vocab_size": 100})


def test_modules_have_qk_norm_and_moe(ckpt):
    model = load_policy(ckpt)
    attn = model.model.layers[1].self_attn
    assert hasattr(attn, "q_norm") and hasattr(attn, "k_norm")
    assert attn.k_proj.out_features < attn.q_proj.out_features  # fewer KV heads
    assert [layer.self_attn.is_sliding for layer in model.model.layers[:4]] == [True, True, True, False]
    assert not hasattr(model.model.layers[0].mlp, "experts")
    assert model.model.layers[1].mlp.experts.gate_up_proj.shape[0] == 8


def test_parameter_count_is_a_few_million(ckpt):
    counts = count_parameters(load_policy(ckpt))
    assert 2_000_000 <= counts.total <= 6_000_000
    assert counts.active < counts.total
    assert counts.active == counts.total - counts.routed_experts * 6 // 8  # top-2 of 8 experts run


def test_special_ids_match_tokenizer(ckpt):
    model, tok = load_policy(ckpt), load_tokenizer(ckpt)
    assert tok.eos_token == "<|endofturn|>"
    assert model.config.eos_token_id == tok.eos_token_id == model.generation_config.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id and model.config.bos_token_id == tok.bos_token_id
    assert model.config.vocab_size == len(tok)
    assert tok.chat_template == CHAT_TEMPLATE


def test_round_trip_gives_identical_logits(ckpt):
    tok = AutoTokenizer.from_pretrained(ckpt)
    loaded = AutoModelForCausalLM.from_pretrained(ckpt)
    assert isinstance(loaded, ExaoneMoeForCausalLM)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same seed rebuilds the same weights in memory
        fresh = ExaoneMoeForCausalLM(loaded.config)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 12 + 30?"}], add_generation_prompt=True, return_tensors="pt"
    )["input_ids"]
    with torch.no_grad():
        a, b = loaded(ids).logits, fresh.eval()(ids).logits
    assert a.shape == (1, ids.shape[1], len(tok))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_seed_decides_weights(tmp_path, ckpt):
    again = build_tiny_checkpoint(tmp_path / "s0", seed=0)
    assert (again / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()
    other = build_tiny_checkpoint(tmp_path / "s1", seed=1)
    w0 = load_policy(ckpt).model.layers[1].mlp.gate.weight
    w1 = load_policy(other).model.layers[1].mlp.gate.weight
    assert not torch.equal(w0, w1)


def test_load_policy_options(ckpt):
    model = load_policy(ckpt, dtype="bfloat16", gradient_checkpointing=True, attn_implementation="eager")
    assert model.dtype == torch.bfloat16
    assert model.config.use_cache is False
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    assert model.config._attn_implementation == "eager"
    with pytest.raises(KexaoneError, match="dtype"):
        load_policy(ckpt, dtype="float8")


def test_missing_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(KexaoneError, match="not found"):
        load_policy(tmp_path / "nope")
    with pytest.raises(KexaoneError, match="not found"):
        load_tokenizer(tmp_path / "nope")
    assert _check_source("LGAI-EXAONE/K-EXAONE-236B-A23B") == "LGAI-EXAONE/K-EXAONE-236B-A23B"  # hub name
    (tmp_path / "empty").mkdir()
    with pytest.raises(KexaoneError, match="cannot load"):
        load_policy(tmp_path / "empty")


def test_train_step_runs_in_seconds(ckpt):
    model, tok = load_policy(ckpt), load_tokenizer(ckpt)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = tok(["What is 3 + 4? The answer is \\boxed{7}. " * 2] * 4, return_tensors="pt")  # 4 x 30 tokens
    losses, times = [], []
    for _ in range(4):
        start = time.perf_counter()
        out = model(**batch, labels=batch["input_ids"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
        losses.append(out.loss.item())
    # 0.6-1.4 s a step measured on 2 cores shared with other jobs (load ~5); the bound leaves headroom.
    assert sum(times[1:]) < 15, f"3 train steps took {sum(times[1:]):.1f}s"  # the first step warms up
    assert losses[-1] < losses[0]  # it learns


def test_kernel_choices_reach_the_model_and_keep_its_outputs(ckpt):
    import torch

    from kexaone_align.config import load_recipe
    from kexaone_align.config.derive import learner_settings

    ids = torch.tensor([[5, 17, 42, 9, 3, 77]])
    default = load_policy(ckpt)
    eager = load_policy(ckpt, experts_implementation="eager", attn_implementation="eager")
    assert eager.config._experts_implementation == "eager" and eager.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(eager(input_ids=ids).logits, default(input_ids=ids).logits)
    # the recipe's model section reaches the learners' settings
    sft_yaml = Path(__file__).parents[1] / "recipes" / "tiny" / "sft.yaml"
    recipe = load_recipe(sft_yaml, ["model.experts_implementation=grouped_mm"])
    assert learner_settings(recipe, 10)["experts_implementation"] == "grouped_mm"
