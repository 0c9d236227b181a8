"""Streaming Hugging Face export: shards written bucket by bucket, reloaded by transformers bit for bit."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import json
import weakref

import pytest
import torch

from kexaone_align.algorithms.sft import sft_loss
from kexaone_align.errors import KexaoneError
from kexaone_align.runtime import export
from kexaone_align.runtime.batching import collate
from kexaone_align.runtime.learner import Learner, LearnerConfig

SMALL = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "layer_types": ["sliding_attention", "full_attention"] * 2,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "head_dim": 16,
}
SHARD = 200_000  # bytes: the SMALL model (~2 MB) becomes many shards
BUCKET = 64 * 1024


def _loss_fn(token_logprobs, batch):
    return sft_loss(token_logprobs, batch["loss_mask"]), {}


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(5, 500, (n,), generator=g).tolist() for n in (9, 12, 6)]
    return collate(ids, [[0, 0] + [1] * (len(x) - 2) for x in ids])


def _learner(path, stage):
    overrides = {"zero_optimization": {"stage3_param_persistence_threshold": 0}} if stage == 3 else {}
    lrn = Learner(path, LearnerConfig(zero_stage=stage, lr=1e-2, ds_config_overrides=overrides))
    lrn.setup()
    lrn.train_step(_batch(), _loss_fn)  # trained weights differ from the checkpoint on disk
    return lrn


def _full_state(learner):
    out = {}
    for bucket in learner.state_dict_stream(1 << 30):
        out.update(bucket)
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from kexaone_align.models import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "policy", seed=0, architecture=SMALL)


@pytest.fixture(scope="module")
def tied_path(tmp_path_factory):
    from kexaone_align.models import build_tiny_checkpoint

    arch = {**SMALL, "tie_word_embeddings": True}
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tied") / "policy", seed=1, architecture=arch)


@pytest.mark.parametrize("stage", [2, 3])
def test_sharded_export_reloads_with_identical_logits(tiny_path, tmp_path, stage):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    learner = _learner(tiny_path, stage)
    out = tmp_path / "hf"
    assert learner.export_hf(
        out, tokenizer_path=tiny_path, max_shard_bytes=SHARD, bucket_bytes=BUCKET
    ) == str(out)

    # the index is HF's sharded format and matches the files exactly
    index = json.loads((out / export.SAFE_INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 4 and files == sorted(learner.last_export["files"])
    assert sorted(p.name for p in out.glob("model*.safetensors")) == files
    seen, total = {}, 0
    for name in files:
        with safe_open(str(out / name), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= SHARD or len(tensors) == 1, (name, size)
        total += size
        seen.update({k: name for k in tensors})
    assert seen == index["weight_map"] and index["metadata"]["total_size"] == total
    # the original (unfused, per-expert) layout that the checkpoint on disk and vLLM use
    with safe_open(str(tiny_path / "model.safetensors"), "pt") as f:
        assert set(seen) == set(f.keys())

    # transformers loads it back to the learner's weights: same logits, bit for bit
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    reference = AutoModelForCausalLM.from_pretrained(tiny_path)
    reference.load_state_dict(_full_state(learner))
    ids = torch.randint(5, 500, (2, 16), generator=torch.Generator().manual_seed(3))
    assert torch.equal(_logits(reloaded, ids), _logits(reference, ids))
    assert not torch.equal(
        _logits(AutoModelForCausalLM.from_pretrained(tiny_path), ids), _logits(reloaded, ids)
    )
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["ExaoneMoeForCausalLM"] and config["dtype"] == "float32"
    assert (out / "generation_config.json").is_file()
    assert len(AutoTokenizer.from_pretrained(out)) == len(AutoTokenizer.from_pretrained(tiny_path))


def test_tied_embedding_is_written_once_and_reties(tied_path, tmp_path):
    from transformers import AutoModelForCausalLM

    learner = _learner(tied_path, 2)
    learner.export_hf(tmp_path / "hf", max_shard_bytes=SHARD, bucket_bytes=BUCKET)
    weight_map = json.loads((tmp_path / "hf" / export.SAFE_INDEX_NAME).read_text())["weight_map"]
    assert "model.embed_tokens.weight" in weight_map and "lm_head.weight" not in weight_map
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    reference = AutoModelForCausalLM.from_pretrained(tied_path)
    reference.load_state_dict(_full_state(learner))
    ids = torch.randint(5, 500, (2, 16), generator=torch.Generator().manual_seed(4))
    assert torch.equal(_logits(reloaded, ids), _logits(reference, ids))


def test_exporter_never_holds_more_than_a_shard_and_a_bucket(tiny_path, tmp_path, monkeypatch):
    """Every tensor the learner gathers or the converter makes is tracked until it is freed."""
    learner = _learner(tiny_path, 3)
    live = {"bytes": 0, "peak": 0, "largest": 0}

    def track(tensor):
        size = tensor.numel() * tensor.element_size()
        live["bytes"] += size
        live["peak"] = max(live["peak"], live["bytes"])
        live["largest"] = max(live["largest"], size)
        weakref.finalize(tensor, lambda: live.__setitem__("bytes", live["bytes"] - size))
        return tensor

    gather = learner.state_dict_bucket
    monkeypatch.setattr(learner, "state_dict_bucket", lambda i, b: [(n, track(t)) for n, t in gather(i, b)])
    convert = export.to_checkpoint_tensors
    monkeypatch.setattr(
        export,
        "to_checkpoint_tensors",
        lambda policy, name, t: {k: v if v is t else track(v) for k, v in convert(policy, name, t).items()},
    )
    learner.export_hf(tmp_path / "hf", max_shard_bytes=SHARD, bucket_bytes=BUCKET)
    total = learner.last_export["total_size"]
    # one shard being filled (or one oversized tensor), the bucket in hand, one tensor mid-conversion
    bound = max(SHARD, live["largest"]) + BUCKET + live["largest"]
    assert bound < total / 2, "test model too small to tell streaming from collecting everything"
    assert live["peak"] <= bound, (live, total)
    assert learner.last_export["peak_held_bytes"] <= max(SHARD, live["largest"])
    assert live["bytes"] == 0  # nothing kept after the export


def test_single_file_export_replaces_old_shards_and_rejects_bad_sizes(tiny_path, tmp_path):
    from transformers import AutoModelForCausalLM

    learner = _learner(tiny_path, 2)
    out = tmp_path / "hf"
    learner.export_hf(out, max_shard_bytes=SHARD)
    assert (out / export.SAFE_INDEX_NAME).is_file()
    learner.export_hf(out)  # default 5 GB: one file, like save_pretrained, and no stale shards left
    assert sorted(p.name for p in out.glob("model*")) == [export.SAFE_WEIGHTS_NAME]
    ids = torch.randint(5, 500, (1, 8), generator=torch.Generator().manual_seed(5))
    reference = AutoModelForCausalLM.from_pretrained(tiny_path)
    reference.load_state_dict(_full_state(learner))
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(out), ids), _logits(reference, ids))
    with pytest.raises(KexaoneError, match="max_shard_bytes"):
        learner.export_hf(tmp_path / "bad", max_shard_bytes=0)
