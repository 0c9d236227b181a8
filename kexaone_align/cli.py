"""The ``kexaone-align`` command: validate, explain, run, plan, rehearse, envgen, verifiers, verify.

User mistakes (``KexaoneError``, missing files, YAML errors, Ctrl-C) print ``error: ...`` and exit 2 with
no traceback. Anything else is a bug: one line plus a hint to rerun with ``--debug`` (exit 1), or the
full traceback under ``--debug``. Heavy imports (transformers, ray, the stages) happen inside handlers
so ``validate`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from kexaone_align.errors import KexaoneError

if TYPE_CHECKING:
    from kexaone_align.config import Recipe

EXIT_USER_ERROR = 2
EXIT_BUG = 1
_PASSTHROUGH = ("verify", "verifiers")  # their arguments belong to kexaone_align.verifiers.commands


def verifier_warnings(recipe: Recipe) -> list[str]:
    """Verifier references that will not resolve at run time (checked without running user code).

    Registered names are looked up in the registry; ``module:attr`` references must name an importable
    module; file references were already checked when the recipe loaded.
    """
    refs = dict(recipe.verifiers)
    if recipe.grouper is not None:
        for task, combo in recipe.grouper.reward.per_task.items():
            for c in combo.components:
                if c.source != "judge" and c.source not in refs:
                    refs[f"grouper.reward.per_task.{task}:{c.source}"] = c.source
            for g in combo.gates:
                if g.verifier not in refs:
                    refs[f"grouper.reward.per_task.{task}:{g.verifier}"] = g.verifier
    if not refs:
        return []
    try:
        from kexaone_align.verifiers import registered_names
    except ImportError as exc:
        return [f"verifiers: cannot check references, kexaone_align.verifiers is not importable ({exc})"]
    names = set(registered_names())
    out = []
    for task, ref in refs.items():
        where = task if task.startswith("grouper.") else f"verifiers.{task}"
        if ":" not in ref:
            if ref not in names:
                out.append(
                    f"{where}: no verifier registered as {ref!r} (registered: {', '.join(sorted(names))})"
                )
        elif ".py:" not in ref:
            module = ref.rpartition(":")[0]
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                out.append(f"{where}: module {module!r} of {ref!r} is not importable")
    return out


def _cmd_validate(args: argparse.Namespace) -> int:
    from kexaone_align.config import explain_key, load_pipeline_stages, load_recipe, recipe_summary

    recipe = load_recipe(args.recipe, args.overrides)
    if args.explain:
        print(explain_key(args.explain).render())
        value: object = recipe
        for part in args.explain.split("."):
            if isinstance(value, list):
                value = value[int(part)] if part.isdigit() and int(part) < len(value) else None
            elif isinstance(value, dict):
                value = value.get(part)
            else:
                value = getattr(value, part, None)
        shown = value.model_dump(mode="json") if hasattr(value, "model_dump") else value
        print(f"  value in this recipe: {json.dumps(shown)}")
        return 0
    print(recipe_summary(recipe))
    stages = load_pipeline_stages(recipe) if recipe.stage == "pipeline" else [recipe]
    for stage in stages:
        if stage is not recipe:
            print()
            print(recipe_summary(stage))
        for warning in verifier_warnings(stage):
            print(f"warning:  {warning}")
    print("ok: recipe is valid")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from kexaone_align.config import Recipe, explain_key

    if args.key:
        print(explain_key(args.key).render())
        return 0
    print("recipe sections and keys (kexaone-align explain KEY for details):")
    for name, info in Recipe.model_fields.items():
        print(f"  {name:<11} {info.description}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from kexaone_align.config import load_recipe, recipe_summary, recipe_to_yaml

    recipe = load_recipe(args.recipe, args.overrides)
    print(recipe_summary(recipe))
    run_dir = recipe.resolved_run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.resolved.yaml").write_text(recipe_to_yaml(recipe), encoding="utf-8")
    print(f"run_dir: {run_dir} (resolved recipe written to recipe.resolved.yaml)")
    try:
        from kexaone_align.stages import run_recipe
    except ImportError as exc:
        raise KexaoneError(
            f"stage {recipe.stage!r} cannot run: kexaone_align.stages.run_recipe is not available ({exc})"
        ) from None
    try:
        result = run_recipe(recipe)
    except NotImplementedError as exc:
        detail = f": {exc}" if str(exc) else ""
        raise KexaoneError(f"stage {recipe.stage!r} is not implemented yet{detail}") from None
    print(json.dumps(result, indent=2, default=str))
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from kexaone_align.config import load_recipe
    from kexaone_align.plan import format_plan, plan_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    plan = plan_recipe(recipe)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


def _cmd_rehearse(args: argparse.Namespace) -> int:
    from kexaone_align.rehearsal import rehearse, write_rehearsal

    if args.write_only:
        print(write_rehearsal(args.recipe, args.out))
        return 0
    summary = rehearse(args.recipe, args.out, kill_stage=None if args.no_kill else args.kill_stage)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _cmd_envgen(args: argparse.Namespace) -> int:
    from kexaone_align.environments.generate import generate_environments, report
    from kexaone_align.reward_models.backends import backend_from_settings

    def backend(kind: str, model: str | None, base_url: str | None) -> object:
        return backend_from_settings(
            {"backend": kind, "model": model, "base_url": base_url, "timeout_s": args.timeout_s}
        )

    writer = backend(args.backend, args.model, args.base_url)
    judge = None
    if not args.no_judge:
        judge = writer
        if args.judge_backend:
            judge = backend(args.judge_backend, args.judge_model, args.judge_base_url)
    verdicts = generate_environments(
        writer, args.themes, args.out, judge=judge, per_theme=args.per_theme,
        max_tokens=args.max_tokens, temperature=args.temperature,
    )  # fmt: skip
    summary = report(verdicts)
    (Path(args.out) / "envgen_report.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2))
    return 0


def _passthrough(name: str, rest: list[str]) -> int:
    """Hand `verify` / `verifiers` to the verifiers package, imported only now."""
    try:
        from kexaone_align.verifiers import commands
    except ImportError as exc:
        raise KexaoneError(
            f"the '{name}' command needs kexaone_align.verifiers.commands, which could not be imported "
            f"({exc})"
        ) from None
    sub = argparse.ArgumentParser(prog=f"kexaone-align {name}")
    if name == "verify":
        commands.add_verify_arguments(sub)
        return int(commands.verify_command(sub.parse_args(rest)))
    commands.add_verifiers_arguments(sub)
    return int(commands.verifiers_command(sub.parse_args(rest)))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks of unexpected errors")
    parser = argparse.ArgumentParser(
        prog="kexaone-align",
        description="K-EXAONE post-training: SFT -> AGAPO -> GROUPER on the full MoE policy.",
        parents=[common],
    )
    subs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def recipe_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("recipe", help="recipe YAML file")
        p.add_argument("overrides", nargs="*", metavar="key.path=value", help="dotted overrides")

    p = subs.add_parser("validate", parents=[common], help="check a recipe and print a summary")
    recipe_args(p)
    p.add_argument("--explain", metavar="KEY", help="describe one key (type, default, description)")
    p.set_defaults(handler=_cmd_validate)

    p = subs.add_parser("explain", parents=[common], help="describe a recipe key, e.g. agapo.group_size")
    p.add_argument("key", nargs="?", help="dotted key path; omit it to list the top-level keys")
    p.set_defaults(handler=_cmd_explain)

    p = subs.add_parser("run", parents=[common], help="validate, then run the stage or pipeline")
    recipe_args(p)
    p.set_defaults(handler=_cmd_run)

    p = subs.add_parser("plan", parents=[common], help="parameters and per-GPU memory on paper")
    recipe_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=_cmd_plan)

    p = subs.add_parser(
        "rehearse", parents=[common], help="CPU dress rehearsal of a GPU-cluster pipeline recipe"
    )
    p.add_argument("recipe", help="pipeline recipe YAML (e.g. recipes/k-exaone-236b/pipeline.yaml)")
    p.add_argument("--out", default="runs/rehearsal", help="directory for assets, runs and logs")
    p.add_argument("--kill-stage", type=int, default=1, help="kill the run once this stage checkpointed")
    p.add_argument("--no-kill", action="store_true", help="run once, without the kill-and-resume")
    p.add_argument("--write-only", action="store_true", help="only write <out>/rehearsal.yaml and assets")
    p.set_defaults(handler=_cmd_rehearse)

    p = subs.add_parser(
        "envgen", parents=[common], help="write stateful tool environments with an LLM, keep the checked ones"
    )
    p.add_argument("themes", nargs="+", help="what each environment is about, e.g. 'library loans'")
    p.add_argument("--out", required=True, help="directory the accepted <name>.json files are written to")
    p.add_argument("--backend", choices=("openai", "local"), required=True, help="the writer's backend")
    p.add_argument("--model", required=True, help="model name (openai) or checkpoint path (local)")
    p.add_argument("--base-url", help="endpoint of an openai backend, e.g. http://host:8000/v1")
    p.add_argument("--judge-backend", choices=("openai", "local"), help="the judge's (default: the writer)")
    p.add_argument("--judge-model", help="the judge's model name or checkpoint path")
    p.add_argument("--judge-base-url", help="the judge's endpoint (openai)")
    p.add_argument("--no-judge", action="store_true", help="structural and solvability checks only")
    p.add_argument("--per-theme", type=int, default=1, help="environments asked for per theme")
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens the writer may write per answer")
    p.add_argument("--temperature", type=float, default=0.7, help="the writer's sampling temperature")
    p.add_argument("--timeout-s", type=float, default=300.0, help="per-request timeout (openai)")
    p.set_defaults(handler=_cmd_envgen)

    # add_help=False: `verify --help` is answered by the verifiers package's own parser.
    subs.add_parser("verifiers", parents=[common], add_help=False, help="list registered verifiers")
    subs.add_parser("verify", parents=[common], add_help=False, help="score a rollouts JSONL file offline")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    debug = "--debug" in argv
    try:
        args, rest = parser.parse_known_args(argv)
        debug = debug or bool(getattr(args, "debug", False))
        if args.command in _PASSTHROUGH:
            return _passthrough(args.command, [a for a in rest if a != "--debug"])
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return int(args.handler(args))
    except KexaoneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", EXIT_USER_ERROR)
    except FileNotFoundError as exc:
        print(f"error: file not found: {exc.filename or exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except yaml.YAMLError as exc:
        print(f"error: YAML: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # e.g. `kexaone-align plan ... | head`
        sys.stdout = open(os.devnull, "w")  # silence the flush at interpreter exit
        return 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_USER_ERROR
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USER_ERROR
    except Exception as exc:
        if debug:
            traceback.print_exc()
        else:
            print(f"error: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
            print("hint: rerun with --debug for the full traceback", file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
