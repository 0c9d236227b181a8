"""The loss registry: recipes name each stage's objective; bad names and options are named errors before
anything starts; a bound loss travels to another process as its reference."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kexaone_align.algorithms.agapo import agapo_loss
from kexaone_align.algorithms.grouper import grouper_loss
from kexaone_align.algorithms.sft import sft_loss
from kexaone_align.errors import KexaoneError
from kexaone_align.losses import bind_loss, registered_losses

ROOT = Path(__file__).resolve().parents[1]

USER_LOSSES = """
import torch
from kexaone_align.algorithms.agapo import agapo_loss
from kexaone_align.losses import register_loss

@register_loss("test_user_scaled_agapo", aggregation="sequences")
def scaled_agapo(logprobs, batch, *, is_cap, scale=1.0):
    adv, mask = batch["advantages"], batch["loss_mask"]
    loss = scale * agapo_loss(logprobs, batch["rollout_logprobs"], adv, mask, is_cap)
    return loss, {"user_loss_scale_max": scale}

def token_mean(logprobs, batch):
    keep = batch["loss_mask"].bool()
    return -logprobs[keep].mean()

def needs_beta(logprobs, batch, *, beta):
    return -beta * logprobs.mean()

def one_arg(logprobs):
    return -logprobs.mean()

def not_scalar(logprobs, batch):
    return -logprobs
"""


@pytest.fixture(scope="module")
def user_file(tmp_path_factory) -> Path:  # one file: running it registers its decorated name once
    path = tmp_path_factory.mktemp("user_losses") / "my_losses.py"
    path.write_text(textwrap.dedent(USER_LOSSES))
    return path


def _micro(n: int = 3, t: int = 5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(n, t, generator=gen)
    mask = torch.ones(n, t)
    mask[0, 3:] = 0
    batch = {
        "loss_mask": mask,
        "rollout_logprobs": logprobs - 0.1 * torch.rand(n, t, generator=gen),
        "advantages": torch.randn(n, generator=gen),
    }
    return logprobs, batch


def test_builtin_losses_are_the_papers_objectives():
    assert {"agapo", "grouper", "sft"} <= set(registered_losses())
    logprobs, batch = _micro()
    agapo = bind_loss("agapo", section="agapo", stage_params={"is_cap": 2.0})
    assert agapo.aggregation == "sequences" and agapo.options == {"is_cap": 2.0}
    loss, metrics = agapo(logprobs, batch)
    want = agapo_loss(logprobs, batch["rollout_logprobs"], batch["advantages"], batch["loss_mask"], 2.0)
    assert torch.equal(loss, want) and metrics["is_ratio_max"] >= metrics["is_ratio_min"]
    grouper = bind_loss("grouper", section="grouper")
    want = grouper_loss(logprobs, batch["advantages"], batch["loss_mask"])
    assert torch.equal(grouper(logprobs, batch)[0], want)
    sft = bind_loss("sft", section="sft", default_aggregation="tokens")
    assert sft.aggregation == "tokens" and torch.equal(
        sft(logprobs, batch)[0], sft_loss(logprobs, batch["loss_mask"])
    )


def test_user_loss_from_a_file_with_options_and_stage_params(user_file):
    logprobs, batch = _micro()
    bound = bind_loss(
        f"{user_file}:scaled_agapo", section="agapo", options={"scale": 0.5}, stage_params={"is_cap": 2.0}
    )
    assert bound.options == {"is_cap": 2.0, "scale": 0.5} and bound.aggregation == "sequences"
    loss, metrics = bound(logprobs, batch)
    base = agapo_loss(logprobs, batch["rollout_logprobs"], batch["advantages"], batch["loss_mask"], 2.0)
    assert loss.item() == pytest.approx(0.5 * base.item()) and metrics == {"user_loss_scale_max": 0.5}
    # the decorator registered the name too, and an undecorated function gets the stage's aggregation
    assert "test_user_scaled_agapo" in registered_losses()
    plain = bind_loss(f"{user_file}:token_mean", section="sft", default_aggregation="tokens")
    assert plain.aggregation == "tokens"
    assert plain(logprobs, batch)[0].item() == pytest.approx(
        -logprobs[batch["loss_mask"].bool()].mean().item()
    )


def test_a_relative_file_reference_becomes_absolute(user_file, monkeypatch):
    monkeypatch.chdir(user_file.parent)
    bound = bind_loss("my_losses.py:token_mean", section="sft")
    assert bound.ref == f"{user_file}:token_mean"


def test_bound_loss_pickles_as_its_reference_and_resolves_in_another_process(user_file):
    bound = bind_loss(f"{user_file}:scaled_agapo", section="agapo", options={"scale": 2.0},
                      stage_params={"is_cap": 1.5})  # fmt: skip
    blob = pickle.dumps(bound)
    assert pickle.loads(blob)._fn is None  # the function itself is not shipped
    logprobs, batch = _micro()
    want = bound(logprobs, batch)[0].item()
    script = textwrap.dedent(f"""
        import pickle, sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from tests.test_losses import _micro
        bound = pickle.loads({blob!r})
        logprobs, batch = _micro()
        print(bound(logprobs, batch)[0].item())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) == pytest.approx(want)


def test_a_decorated_name_resolves_in_a_process_that_only_unpickles_it(tmp_path, monkeypatch):
    """A name registered by ``@register_loss`` in the driver's own module: the learner process imports that
    module (which registers the name) before looking the name up."""
    (tmp_path / "team_losses.py").write_text(
        textwrap.dedent("""
        from kexaone_align.losses import register_loss

        @register_loss("test_team_token_mean", aggregation="tokens")
        def team_token_mean(logprobs, batch, *, weight=1.0):
            return -weight * logprobs[batch["loss_mask"].bool()].mean()
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import team_losses  # noqa: F401  (registers the name, as a user's driver script would)

    bound = bind_loss("test_team_token_mean", section="sft", options={"weight": 3.0})
    assert bound.origin == "team_losses" and bound.aggregation == "tokens"
    logprobs, batch = _micro()
    script = textwrap.dedent(f"""
        import pickle, sys
        sys.path[:0] = [{str(ROOT)!r}, {str(tmp_path)!r}]
        from tests.test_losses import _micro
        logprobs, batch = _micro()
        print(pickle.loads({pickle.dumps(bound)!r})(logprobs, batch)[0].item())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) == pytest.approx(bound(logprobs, batch)[0].item())


@pytest.mark.parametrize(
    ("ref", "kwargs", "message"),
    [
        ("no_such_loss", {}, r"unknown loss 'no_such_loss': registered losses are \[.*'agapo'"),
        ("agapo", {"options": {"is_cap": 3.0}}, r"agapo.loss_options sets \['is_cap'\].*set agapo.is_cap"),
        ("agapo", {}, r"agapo.loss 'agapo' needs \['is_cap'\] in agapo.loss_options"),
        (
            "{f}:scaled_agapo",
            {"options": {"scael": 1}},
            r"takes no option 'scael' \(its options: \['is_cap', 'scale'\]\)",
        ),
        ("{f}:needs_beta", {}, r"needs \['beta'\]"),
        ("{f}:one_arg", {}, r"must take \(token_logprobs, micro_batch, \*\*options\)"),
        ("{f}:missing", {}, r"no attribute 'missing'"),
        ("/nowhere/losses.py:fn", {}, r"file '/nowhere/losses.py' does not exist"),
        ("no_such_module_xyz:fn", {}, r"cannot import 'no_such_module_xyz'"),
        (":fn", {}, r"must look like 'module:attr'"),
    ],
)
def test_bad_loss_references_and_options_are_named(user_file, ref, kwargs, message):
    kwargs.setdefault("stage_params", {"is_cap": 2.0} if "is_cap" in kwargs.get("options", {}) else None)
    with pytest.raises(KexaoneError, match=message):
        bind_loss(ref.format(f=user_file), section="agapo", **kwargs)


def test_a_loss_returning_a_non_scalar_is_named(user_file):
    bound = bind_loss(f"{user_file}:not_scalar", section="sft")
    logprobs, batch = _micro()
    with pytest.raises(KexaoneError, match=r"must return a scalar tensor.*\(3, 5\)"):
        bound(logprobs, batch)


def test_a_recipe_naming_an_unknown_loss_fails_before_ray_starts(tmp_path):
    import ray

    from kexaone_align.config import load_recipe
    from kexaone_align.stages import agapo, sft

    was_up = ray.is_initialized()
    recipe = load_recipe(ROOT / "recipes/tiny/agapo.yaml", ["agapo.loss=agapo_v2", f"run_dir={tmp_path}"])
    with pytest.raises(KexaoneError, match="unknown loss 'agapo_v2'"):
        agapo.run(recipe)
    recipe = load_recipe(ROOT / "recipes/tiny/sft.yaml", ["sft.loss_options.label_smoothing=0.1"])
    with pytest.raises(KexaoneError, match=r"sft.loss_options: loss 'sft' takes no option 'label_smoothing'"):
        sft.run(recipe)
    assert ray.is_initialized() == was_up and not any(tmp_path.iterdir())


def test_a_recipe_file_names_its_loss_file_relative_to_itself(user_file, tmp_path):
    import yaml

    from kexaone_align.config import load_recipe

    doc = yaml.safe_load((ROOT / "recipes/tiny/agapo.yaml").read_text())
    doc["agapo"] |= {"loss": "my_losses.py:scaled_agapo", "loss_options": {"scale": 0.5}}
    recipe_path = user_file.parent / "agapo_user_loss.yaml"
    recipe_path.write_text(yaml.safe_dump(doc))
    recipe = load_recipe(recipe_path)
    assert recipe.agapo.loss == f"{user_file}:scaled_agapo"
    doc["agapo"]["loss"] = "nowhere.py:scaled_agapo"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(KexaoneError, match=r"agapo.loss: loss file not found: .*nowhere.py"):
        load_recipe(tmp_path / "bad.yaml")
