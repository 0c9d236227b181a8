"""The `kexaone-align` command: exit codes, messages without tracebacks, run/verify wiring."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from kexaone_align import cli
from kexaone_align.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The real command line in a fresh interpreter (what a user sees)."""
    return subprocess.run(
        [sys.executable, "-m", "kexaone_align", *args], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_validate_tiny_recipe_subprocess() -> None:
    proc = run_cli("validate", "recipes/tiny/agapo.yaml", "agapo.group_size=4")
    assert proc.returncode == 0, proc.stderr
    assert "stage:    agapo" in proc.stdout and "group_size=4" in proc.stdout
    assert "ok: recipe is valid" in proc.stdout


def test_invalid_recipe_subprocess_exit_2_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    recipe = yaml.safe_load((TINY / "agapo.yaml").read_text())
    recipe["agapo"]["group_size"] = 1
    recipe["agapo"]["is_cap"] = -1.0
    recipe["rollout"]["colour"] = "red"
    bad.write_text(yaml.safe_dump(recipe))
    proc = run_cli("validate", str(bad))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    for key in ("agapo.group_size", "agapo.is_cap", "rollout.colour", str(bad)):
        assert key in proc.stderr


def test_broken_yaml_subprocess_names_line(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("stage: sft\nsft:\n  lr: [1e-5\n  epochs: 2\n")
    proc = run_cli("validate", str(bad))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "line 4" in proc.stderr or "line 3" in proc.stderr


def test_bad_override_subprocess() -> None:
    proc = run_cli("validate", "recipes/tiny/agapo.yaml", "agapo.group_sise=4")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "agapo.group_sise" in proc.stderr
    proc = run_cli("validate", "recipes/tiny/agapo.yaml", "agapo.group_size=eight")
    assert proc.returncode == 2 and "agapo.group_size" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", ["sft", "agapo", "grouper", "pipeline"])
def test_validate_all_tiny(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", str(TINY / f"{name}.yaml")]) == 0
    assert "ok: recipe is valid" in capsys.readouterr().out


def test_missing_recipe_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", "does/not/exist.yaml"]) == 2
    assert "does/not/exist.yaml" in capsys.readouterr().err


def test_explain(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", str(TINY / "agapo.yaml"), "--explain", "agapo.is_cap"]) == 0
    out = capsys.readouterr().out
    assert "float" in out and "truncat" in out and "value in this recipe: 2.0" in out
    assert cli.main(["explain", "rollout.top_p"]) == 0
    assert "0.95" in capsys.readouterr().out
    assert cli.main(["explain", "rollout.top_pp"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_run_writes_resolved_recipe_then_reports_missing_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import kexaone_align.stages as stages

    monkeypatch.delattr(stages, "run_recipe", raising=False)
    run_dir = tmp_path / "run"
    code = cli.main(["run", str(TINY / "agapo.yaml"), f"run_dir={run_dir}", "agapo.steps=3"])
    err = capsys.readouterr().err
    assert code == 2 and "'agapo'" in err and "Traceback" not in err
    resolved = load_recipe(run_dir / "recipe.resolved.yaml")
    assert resolved.agapo.steps == 3 and resolved.run_dir == str(run_dir)


def test_run_hands_recipe_to_stages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import kexaone_align.stages as stages

    seen = {}

    def fake_run(recipe):
        seen["recipe"] = recipe
        return {"final_accuracy": 0.5}

    monkeypatch.setattr(stages, "run_recipe", fake_run, raising=False)
    assert cli.main(["run", str(TINY / "sft.yaml"), f"run_dir={tmp_path}"]) == 0
    assert seen["recipe"].stage == "sft" and '"final_accuracy": 0.5' in capsys.readouterr().out

    def not_implemented(recipe):
        raise NotImplementedError("grouper loop")

    monkeypatch.setattr(stages, "run_recipe", not_implemented)
    assert cli.main(["run", str(TINY / "grouper.yaml"), f"run_dir={tmp_path}"]) == 2
    assert "stage 'grouper' is not implemented" in capsys.readouterr().err


def test_unexpected_errors_hint_debug(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def boom(args):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(cli, "_cmd_explain", boom)
    assert cli.main(["explain", "seed"]) == 1
    err = capsys.readouterr().err
    assert "kaboom" in err and "--debug" in err and "Traceback" not in err
    assert cli.main(["--debug", "explain", "seed"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_keyboard_interrupt_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_explain", interrupted)
    assert cli.main(["explain", "seed"]) == 2
    assert "interrupted" in capsys.readouterr().err


def test_verify_commands_are_passed_through(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {}
    fake = types.ModuleType("kexaone_align.verifiers.commands")
    fake.add_verify_arguments = lambda p: p.add_argument("--data", required=True)
    fake.verify_command = lambda args: calls.setdefault("verify", args.data) and 0
    fake.add_verifiers_arguments = lambda p: p.add_argument("--json", action="store_true")
    fake.verifiers_command = lambda args: calls.setdefault("verifiers", args.json) and 3
    import kexaone_align.verifiers as verifiers_pkg

    monkeypatch.setitem(sys.modules, "kexaone_align.verifiers.commands", fake)
    monkeypatch.setattr(verifiers_pkg, "commands", fake, raising=False)
    assert cli.main(["verify", "--data", "rollouts.jsonl"]) == 0
    assert cli.main(["verifiers", "--json"]) == 3
    assert calls == {"verify": "rollouts.jsonl", "verifiers": True}
    assert cli.main(["verify"]) == 2  # missing --data: argparse usage error, exit 2


def test_unknown_arguments_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plan", str(TINY / "sft.yaml"), "--jsn"]) == 2
    assert "--jsn" in capsys.readouterr().err


def test_validate_warns_about_unresolvable_verifiers(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("kexaone_align.verifiers")
    code = cli.main(
        ["validate", str(TINY / "agapo.yaml"), "verifiers.math=mathh", "verifiers.x=no_such_pkg.mod:fn"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "verifiers.math: no verifier registered as 'mathh'" in out
    assert "verifiers.x: module 'no_such_pkg.mod'" in out
    assert cli.main(["validate", str(TINY / "agapo.yaml")]) == 0
    assert "warning" not in capsys.readouterr().out  # math is registered


def test_explain_without_key_lists_sections(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["explain"]) == 0
    out = capsys.readouterr().out
    for section in ("model", "agapo", "rollout", "learners", "cluster", "verifiers", "checkpoint"):
        assert f"  {section} " in out
