"""Recipe schema, YAML loading, dotted overrides and error messages (in-process, fast)."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from kexaone_align.config import (
    Recipe,
    explain_key,
    load_pipeline_stages,
    load_recipe,
    recipe_to_yaml,
)
from kexaone_align.config.schema import as_model
from kexaone_align.errors import KexaoneError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny"
BIG = ROOT / "recipes" / "k-exaone-236b"
ALL_RECIPES = sorted(TINY.glob("*.yaml")) + sorted(BIG.glob("*.yaml"))

TINY_ARCH = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "sliding_window": 16,
}


def write_recipe(tmp_path: Path, data: dict | str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def agapo_recipe(**agapo) -> dict:
    return {
        "stage": "agapo",
        "model": {"source": "tiny", "architecture": dict(TINY_ARCH)},
        "data": {"generator": "tiny_arithmetic"},
        "agapo": agapo,
    }


def error_of(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(KexaoneError) as info:
        load_recipe(path, overrides or [])
    return str(info.value)


@pytest.mark.parametrize("path", ALL_RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_recipes_are_valid(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.source_path == path.resolve()
    if recipe.stage == "pipeline":
        stages = load_pipeline_stages(recipe)
        expected = ["sft", "agapo"] if path.name == "tools.yaml" else ["sft", "agapo", "grouper"]
        assert [s.stage for s in stages] == expected
        assert all(Path(s.run_dir).parent == recipe.resolved_run_dir for s in stages)
    else:
        assert recipe.algorithm is getattr(recipe, recipe.stage)


def test_tiny_recipes_are_cpu_local_and_toy_sized() -> None:
    for name in ("sft", "agapo", "grouper"):
        r = load_recipe(TINY / f"{name}.yaml")
        assert r.model.source == "tiny" and r.cluster.address is None and r.cluster.gpus_per_node == 0
        assert r.learners.zero_stage == 2 and r.learners.precision == "fp32" and r.learners.backend == "gloo"
        assert r.learners.num_learners == 1 and r.rollout.backend == "hf"
        assert r.data.generator == "tiny_arithmetic"
        arch = r.model.architecture
        assert arch.resolved_layer_types()[:4] == ["sliding_attention"] * 3 + ["full_attention"]
        assert arch.resolved_mlp_layer_types()[0] == "dense"
        assert arch.num_key_value_heads < arch.num_attention_heads


def test_236b_recipes_match_the_published_model() -> None:
    for name in ("sft", "agapo", "grouper"):
        r = load_recipe(BIG / f"{name}.yaml")
        arch = r.model.architecture
        assert (r.model.source, r.model.path) == ("pretrained", "LGAI-EXAONE/K-EXAONE-236B-A23B")
        assert (arch.hidden_size, arch.num_hidden_layers, arch.vocab_size) == (6144, 48, 153600)
        assert (arch.num_attention_heads, arch.num_key_value_heads, arch.resolved_head_dim) == (64, 8, 128)
        assert (arch.num_experts, arch.num_experts_per_tok, arch.num_shared_experts) == (128, 8, 1)
        assert (arch.moe_intermediate_size, arch.intermediate_size, arch.sliding_window) == (2048, 18432, 128)
        layers = arch.resolved_layer_types()
        assert layers.count("full_attention") == 12 and layers[3::4] == ["full_attention"] * 12
        assert r.learners.zero_stage == 3 and r.learners.precision == "bf16" and r.learners.backend == "nccl"
        if name != "sft":
            assert r.rollout.backend == "vllm" and r.rollout.tensor_parallel_size == 8
            assert (r.rollout.temperature, r.rollout.top_p) == (1.0, 0.95)


def test_unknown_keys_are_named_with_a_suggestion(tmp_path: Path) -> None:
    data = agapo_recipe(group_size=4, grop=3)
    data["rollout"] = {"temprature": 0.5}
    data["colour"] = "blue"
    msg = error_of(write_recipe(tmp_path, data))
    assert str(tmp_path / "recipe.yaml") in msg
    assert "agapo.grop" in msg and "rollout.temprature" in msg and "colour" in msg
    assert "did you mean 'temperature'" in msg


def test_group_size_below_two_is_refused(tmp_path: Path) -> None:
    msg = error_of(write_recipe(tmp_path, agapo_recipe(group_size=1)))
    assert "agapo.group_size" in msg and "greater than or equal to 2" in msg


@pytest.mark.parametrize("value", ["eight", "8", 8.0, True])
def test_group_size_is_not_coerced(tmp_path: Path, value: object) -> None:
    msg = error_of(write_recipe(tmp_path, agapo_recipe(group_size=value)))
    assert "agapo.group_size" in msg and "valid integer" in msg


def test_negative_is_cap_and_lr_are_refused(tmp_path: Path) -> None:
    msg = error_of(write_recipe(tmp_path, agapo_recipe(is_cap=-0.5, lr=-1e-5)))
    assert "agapo.is_cap" in msg and "agapo.lr" in msg
    sft = {"stage": "sft", "model": agapo_recipe()["model"], "data": {"generator": "g"}, "sft": {"lr": 0}}
    assert "sft.lr" in error_of(write_recipe(tmp_path, sft, "sft.yaml"))


def test_errors_name_the_line(tmp_path: Path) -> None:
    text = "stage: agapo\nmodel:\n  source: tiny\ndata: {generator: g}\nagapo:\n  group_size: 1\n"
    msg = error_of(write_recipe(tmp_path, text))
    assert "agapo.group_size (line 6)" in msg


def test_broken_yaml_names_line_and_column(tmp_path: Path) -> None:
    msg = error_of(write_recipe(tmp_path, "stage: sft\nmodel:\n  source: tiny\n   bad: [\n"))
    assert "YAML syntax error at line 4" in msg and "column" in msg and "recipe.yaml" in msg


def test_missing_file_is_named(tmp_path: Path) -> None:
    assert "recipe file not found" in error_of(tmp_path / "nope.yaml")
    assert "nope.yaml" in error_of(tmp_path / "nope.yaml")


def test_exponent_floats_without_dot_are_floats(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, "stage: agapo\nmodel: {source: tiny}\n", "x.yaml")
    path.write_text(
        yaml.safe_dump({k: v for k, v in agapo_recipe().items() if k != "agapo"}) + "agapo:\n  lr: 3e-6\n"
    )
    assert load_recipe(path).agapo.lr == pytest.approx(3e-6)


def test_overrides_are_applied_and_validated() -> None:
    r = load_recipe(
        TINY / "agapo.yaml",
        [
            "agapo.group_size=4",
            "agapo.lr=5e-5",
            "rollout.temperature=0.7",
            "verifiers.code=code",
            "learners.betas=[0.8, 0.9]",
            "model.freeze_router=false",
        ],
    )
    assert r.agapo.group_size == 4 and r.agapo.lr == pytest.approx(5e-5)
    assert r.rollout.temperature == 0.7 and r.verifiers["code"] == "code"
    assert r.learners.betas == [0.8, 0.9]
    assert r.freeze_router is False
    assert load_recipe(TINY / "agapo.yaml").freeze_router is True
    assert load_recipe(TINY / "sft.yaml").freeze_router is False


def test_bad_override_path_is_refused_by_name() -> None:
    with pytest.raises(KexaoneError, match=r"agapo.group_sise.*did you mean 'group_size'"):
        load_recipe(TINY / "agapo.yaml", ["agapo.group_sise=4"])
    with pytest.raises(KexaoneError, match=r"expected key\.path=value"):
        load_recipe(TINY / "agapo.yaml", ["agapo.group_size"])
    with pytest.raises(KexaoneError, match="not a section"):
        load_recipe(TINY / "agapo.yaml", ["seed.x=1"])


def test_override_of_wrong_type_is_refused() -> None:
    with pytest.raises(KexaoneError) as info:
        load_recipe(TINY / "agapo.yaml", ["agapo.group_size=eight"])
    assert "agapo.group_size (from override)" in str(info.value) and "valid integer" in str(info.value)
    with pytest.raises(KexaoneError, match=r"learners\.zero_stage"):
        load_recipe(TINY / "agapo.yaml", ["learners.zero_stage=1"])


def test_stage_sections_must_match_the_stage() -> None:
    with pytest.raises(KexaoneError, match=r"agapo.*section not allowed, stage is 'sft'"):
        load_recipe(TINY / "sft.yaml", ["agapo.group_size=4"])
    r = load_recipe(TINY / "sft.yaml", ["stage=agapo", "sft=null"])
    assert r.agapo.group_size == 8  # default section filled in for the stage


def test_cross_field_checks_name_the_key(tmp_path: Path) -> None:
    data = agapo_recipe()
    data["model"] = {"source": "pretrained"}
    assert "model.path" in error_of(write_recipe(tmp_path, data))
    data = agapo_recipe()
    data["model"]["architecture"]["num_key_value_heads"] = 3
    assert "model.architecture.num_attention_heads" in error_of(write_recipe(tmp_path, data))
    msg = error_of(TINY / "agapo.yaml", ["learners.backend=nccl"])
    assert "learners.backend" in msg and "needs GPUs" in msg
    msg = error_of(BIG / "agapo.yaml", ["learners.num_learners=1000"])
    assert "cluster" in msg and "needs 1064 GPUs" in msg
    assert "rollout.tensor_parallel_size" in error_of(BIG / "agapo.yaml", ["rollout.tensor_parallel_size=7"])


def test_grouper_reward_needs_a_judge_when_used() -> None:
    msg = error_of(TINY / "grouper.yaml", ["grouper.reward.per_task.chat={components: [{source: judge}]}"])
    assert "grouper.reward.judge.backend" in msg


def test_verifier_references(tmp_path: Path) -> None:
    (tmp_path / "my_verifier.py").write_text("def score(sample):\n    return 1.0\n")
    data = agapo_recipe()
    data["verifiers"] = {"math": "math", "custom": "my_verifier.py:score", "mod": "pkg.mod:Verifier"}
    r = load_recipe(write_recipe(tmp_path, data))
    assert r.verifiers["custom"] == f"{tmp_path / 'my_verifier.py'}:score"
    data["verifiers"] = {"x": "missing.py:score"}
    assert "verifiers.x" in error_of(write_recipe(tmp_path, data))
    data["verifiers"] = {"x": "not a ref!"}
    assert "verifiers" in error_of(write_recipe(tmp_path, data))


def test_pipeline_rules(tmp_path: Path) -> None:
    bad = {"stage": "pipeline", "pipeline": [{"recipe": str(TINY / "sft.yaml")}], "agapo": {}}
    assert "pipeline recipe cannot have an algorithm section" in error_of(write_recipe(tmp_path, bad))
    missing = {"stage": "pipeline", "pipeline": [{"recipe": "nope.yaml"}]}
    assert "pipeline.0.recipe" in error_of(write_recipe(tmp_path, missing))
    ok = {
        "stage": "pipeline",
        "run_dir": str(tmp_path / "runs"),
        "pipeline": [
            {"recipe": str(TINY / "sft.yaml"), "overrides": ["sft.max_steps=3"]},
            {"recipe": str(TINY / "agapo.yaml"), "overrides": ["agapo.group_size=1"]},
        ],
    }
    with pytest.raises(KexaoneError, match=r"(?s)pipeline stage 1.*agapo.group_size"):
        load_pipeline_stages(load_recipe(write_recipe(tmp_path, ok)))
    ok["pipeline"][1]["overrides"] = []
    stages = load_pipeline_stages(load_recipe(write_recipe(tmp_path, ok)))
    assert stages[0].sft.max_steps == 3 and stages[0].run_dir == str(tmp_path / "runs" / "00_sft")


def test_resolved_yaml_round_trips(tmp_path: Path) -> None:
    for path in (TINY / "grouper.yaml", BIG / "agapo.yaml"):
        recipe = load_recipe(path, ["seed=7"])
        again = load_recipe(write_recipe(tmp_path, recipe_to_yaml(recipe), "resolved.yaml"))
        assert again.model_dump() == recipe.model_dump()


def test_explain_gives_description_type_and_default() -> None:
    help_ = explain_key("agapo.group_size")
    assert help_.type == "int" and help_.default == "8" and ">= 2" in help_.constraints
    assert "leave-one-out" in help_.description
    assert "vllm" in explain_key("rollout.backend").type
    assert "temperature" in explain_key("rollout").subkeys
    with pytest.raises(KexaoneError, match="did you mean 'is_cap'"):
        explain_key("agapo.is_capp")


def _sections(model: type[BaseModel], seen: set[type]) -> None:
    if model in seen:
        return
    seen.add(model)
    for info in model.model_fields.values():
        for arg in [info.annotation, *typing.get_args(info.annotation)]:
            for inner in [arg, *typing.get_args(arg)]:
                sub = as_model(inner)
                if sub is not None:
                    _sections(sub, seen)


def test_every_field_is_documented() -> None:
    seen: set[type] = set()
    _sections(Recipe, seen)
    assert len(seen) >= 15
    for model in seen:
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name} has no description"


def test_schedule_steps_and_learner_settings() -> None:
    from kexaone_align.config import learner_settings, schedule_steps

    wsd = load_recipe(BIG / "sft.yaml")  # wsd, 50 warmup, decay over the last 10%
    assert schedule_steps(wsd, 1050) == {"warmup_steps": 50, "stable_steps": 900, "decay_steps": 100}
    cos = load_recipe(TINY / "sft.yaml", ["learners.lr_schedule=cosine"])  # cosine, 10 warmup
    assert schedule_steps(cos, 100) == {"warmup_steps": 10, "stable_steps": 0, "decay_steps": 90}
    tiny_wsd = load_recipe(TINY / "sft.yaml")  # wsd, 10 warmup, decay over the last 20%
    assert schedule_steps(tiny_wsd, 100) == {"warmup_steps": 10, "stable_steps": 72, "decay_steps": 18}
    # a run no longer than its warmup (e.g. sft.max_steps=2 on the tiny recipe) still gets a valid schedule
    assert schedule_steps(tiny_wsd, 4) == {"warmup_steps": 4, "stable_steps": 0, "decay_steps": 1}
    const = load_recipe(TINY / "agapo.yaml", ["learners.grad_clip=null"])
    settings = learner_settings(const, 40)
    assert settings["lr"] == const.agapo.lr and settings["freeze_router"] is True
    assert settings["grad_clip"] == 0.0 and settings["decay_steps"] == 0
    with pytest.raises(KexaoneError):
        schedule_steps(const, 0)
    try:
        from kexaone_align.runtime.learner import LearnerConfig
    except ImportError:  # the runtime is another module; the keys are what matters here
        return
    LearnerConfig(**learner_settings(wsd, 1050)).validate()
    LearnerConfig(**settings).validate()
    short = LearnerConfig(**learner_settings(tiny_wsd, 4))
    short.validate()
    assert [short.lr_multiplier()(step) for step in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    msg = error_of(write_recipe(tmp_path, "stage: sft\nseed: 1\nsft:\n  lr: 1.0\nseed: 2\n"))
    assert "duplicate key 'seed' at line 5 (first defined at line 2)" in msg


def test_overrides_inside_lists() -> None:
    r = load_recipe(TINY / "pipeline.yaml", ["pipeline.0.overrides=[sft.max_steps=2]"])
    assert r.pipeline[0].overrides == ["sft.max_steps=2"]
    assert load_pipeline_stages(r)[0].sft.max_steps == 2
    with pytest.raises(KexaoneError, match=r"list of 3 entries.*pipeline\.0\.recipe"):
        load_recipe(TINY / "pipeline.yaml", ["pipeline.recipe=x.yaml"])


def test_start_from_checkpoint_chains_stages(tmp_path: Path) -> None:
    from kexaone_align.config import start_from_checkpoint

    agapo = load_recipe(TINY / "agapo.yaml")
    chained = start_from_checkpoint(agapo, tmp_path / "export")
    assert (chained.model.source, chained.model.path) == ("pretrained", str(tmp_path / "export"))
    assert chained.tokenizer.source == "pretrained" and chained.tokenizer.path is None
    assert chained.agapo == agapo.agapo and chained.source_path == agapo.source_path
    assert agapo.model.source == "tiny"  # the original is untouched
    # what the recipe left unset stays unset, so stage defaults still apply (RL prompts in reasoning mode)
    assert "reasoning_fraction" not in chained.data.model_fields_set
    assert chained.data.model_fields_set == agapo.data.model_fields_set


def test_pipeline_stages_keep_unset_fields_unset() -> None:
    from kexaone_align.config.loading import load_pipeline_stages

    stages = load_pipeline_stages(load_recipe(TINY / "pipeline.yaml"))
    agapo = next(s for s in stages if s.stage == "agapo")
    assert agapo.data.model_fields_set == load_recipe(TINY / "agapo.yaml").data.model_fields_set
    assert "reasoning_fraction" not in agapo.data.model_fields_set  # RL prompts keep reasoning mode


def test_tiny_recipe_architecture_matches_the_models_kit() -> None:
    tiny = pytest.importorskip("kexaone_align.models.tiny")
    arch = load_recipe(TINY / "sft.yaml").model.architecture.to_hf_kwargs()
    for key, value in tiny.TINY_ARCHITECTURE.items():
        assert arch.get(key) == (list(value) if isinstance(value, tuple) else value), key


def test_data_files_resolve_against_the_recipe(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("{}\n")
    data = agapo_recipe()
    data["data"] = {
        "train_files": ["data/train.jsonl", "org/hub-dataset"],
        "eval_files": ["data/missing.jsonl"],
    }
    recipe = load_recipe(write_recipe(tmp_path, data))
    assert recipe.data.train_files == [str(tmp_path / "data" / "train.jsonl"), "org/hub-dataset"]
    assert recipe.data.eval_files == [str(tmp_path / "data" / "missing.jsonl")]
    assert recipe.warnings == [
        f"data.eval_files.0: not found on this machine: {tmp_path / 'data' / 'missing.jsonl'}"
    ]


def test_recipe_pickles_for_ray_actors() -> None:
    import pickle

    recipe = load_recipe(TINY / "agapo.yaml")
    again = pickle.loads(pickle.dumps(recipe))
    assert again == recipe and again.source_path == recipe.source_path and again.freeze_router is True


def test_checkpoint_path_with_tiny_source_is_refused() -> None:
    # a path next to source 'tiny' used to be ignored silently: a random model trained instead
    with pytest.raises(KexaoneError, match=r"model\.path.*source.*pretrained"):
        load_recipe(TINY / "agapo.yaml", ["model.path=/some/sft/export"])
    ok = load_recipe(TINY / "agapo.yaml", ["model.source=pretrained", "model.path=/some/sft/export"])
    assert ok.model.path == "/some/sft/export"


def test_generator_options_take_lists(tmp_path: Path) -> None:
    from kexaone_align.config import recipe_to_yaml
    from kexaone_align.stages.rl import load_prompt_rows

    data = agapo_recipe()
    data["data"].update(generator_options={"operations": ["+", "-"]}, num_train=200, num_eval=4)
    recipe = load_recipe(write_recipe(tmp_path, data))
    assert recipe.data.generator_options["operations"] == ["+", "-"]
    again = load_recipe(write_recipe(tmp_path, recipe_to_yaml(recipe), "resolved.yaml"))
    assert again.data.generator_options == {"operations": ["+", "-"]}  # recipe.resolved.yaml keeps it
    train, _ = load_prompt_rows(recipe)
    ops = {r.metadata["problem"].split()[1] for r in train}
    assert ops == {"+", "-"}


def test_learner_threads_reach_the_learners_and_overlap_is_warned() -> None:
    from kexaone_align.config import learner_settings

    turns = load_recipe(TINY / "agapo.yaml", ["learners.threads=2", "cluster.cpus_per_actor=0.5"])
    assert learner_settings(turns, 10)["threads"] == 2
    assert not [w for w in turns.warnings if "learners.threads" in w]  # synchronous: phases take turns
    assert learner_settings(load_recipe(TINY / "agapo.yaml"), 10)["threads"] is None  # Ray's CPUs decide
    overlap = load_recipe(TINY / "agapo.yaml", ["learners.threads=2", "rollout.max_staleness=1"])
    assert any("learners.threads" in w and "compete" in w for w in overlap.warnings)
    with pytest.raises(KexaoneError, match=r"learners\.threads"):
        load_recipe(TINY / "agapo.yaml", ["learners.threads=0"])
