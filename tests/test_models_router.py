"""Router freezing: an optimizer step leaves every MoE router untouched while the experts learn."""

import pytest
import torch
from transformers import ExaoneMoeForCausalLM, LlamaConfig

from kexaone_align.errors import KexaoneError
from kexaone_align.models import freeze_router, k_exaone_236b_config, meta_model, tiny_config


def _tiny_model() -> ExaoneMoeForCausalLM:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ExaoneMoeForCausalLM(tiny_config(256))


def test_optimizer_step_keeps_routers_and_moves_experts():
    model = _tiny_model()
    report = freeze_router(model)
    assert report.num_routers == 7  # every layer but the dense first one
    assert report.parameter_names == [f"model.layers.{i}.mlp.gate.weight" for i in range(1, 8)]
    assert report.num_parameters == 7 * 8 * 128
    assert all(name.endswith("e_score_correction_bias") for name in report.buffer_names)

    routers = {n: p.detach().clone() for n, p in model.named_parameters() if ".mlp.gate." in n}
    biases = {n: b.clone() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
    experts = {n: p.detach().clone() for n, p in model.named_parameters() if ".mlp.experts." in n}
    assert routers and experts and biases

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    opt.step()

    params = dict(model.named_parameters())
    for name, before in routers.items():
        assert not params[name].requires_grad and params[name].grad is None
        assert torch.equal(params[name], before), name
    buffers = dict(model.named_buffers())
    for name, before in biases.items():
        assert torch.equal(buffers[name], before)
    changed = [n for n, before in experts.items() if not torch.equal(params[n], before)]
    assert len(changed) == len(experts), "every MoE layer's experts should have been updated"


def test_report_is_readable():
    text = str(freeze_router(_tiny_model()))
    assert "froze 7 MoE routers" in text and "7,168 parameters" in text
    assert "model.layers.1.mlp.gate.weight" in text and "+4 more" in text
    assert "e_score_correction_bias" in text


def test_works_on_a_meta_device_236b_model():
    model = meta_model(k_exaone_236b_config())
    report = freeze_router(model)
    assert report.num_routers == 47
    assert report.num_parameters == 47 * 128 * 6144
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("mlp.gate.weight"))
    assert model.model.layers[5].mlp.experts.gate_up_proj.requires_grad


def test_dense_model_has_no_router():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    with pytest.raises(KexaoneError, match="no MoE router"):
        freeze_router(meta_model(cfg))
