"""Parameter counting on the meta device: the real K-EXAONE-236B-A23B shape, without memory."""

from kexaone_align.models import (
    ParameterCount,
    count_parameters,
    k_exaone_236b_config,
    meta_model,
    tiny_config,
)


def test_k_exaone_236b_counts():
    cfg = k_exaone_236b_config()
    model = meta_model(cfg)
    assert all(p.device.type == "meta" for p in model.parameters())
    counts = count_parameters(model)
    # Model card: 236B total, 23B active (MTP layer not included; transformers does not build it).
    assert counts.total == 236_571_150_336
    assert counts.active == 23_668_279_296
    assert counts.embedding == 2 * 153_600 * 6144  # input embedding + untied lm_head
    assert counts.routed_experts == 47 * 128 * 3 * 6144 * 2048
    assert 234e9 < counts.total - counts.embedding < 235e9  # "234B without embeddings"
    assert count_parameters(cfg) == counts  # a config is counted through a meta model


def test_active_count_matches_hand_computation_on_tiny():
    cfg = tiny_config(512)
    counts = count_parameters(cfg)
    h, e, k, f = cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    per_expert = 3 * h * f
    n_moe = cfg.num_hidden_layers - 1
    assert counts.routed_experts == n_moe * e * per_expert
    assert counts.total - counts.active == n_moe * (e - k) * per_expert
    assert counts.total == sum(p.numel() for p in meta_model(cfg).parameters())


def test_str_is_readable():
    text = str(ParameterCount(total=236_571_150_336, active=23_668_279_296, embedding=1, routed_experts=2))
    assert text.startswith("236.57B total, 23.67B active")
