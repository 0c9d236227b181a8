"""``load_recipe``: YAML file + dotted overrides -> validated ``Recipe``, or one readable error.

Overrides are applied to the raw mapping *before* validation, so an override is checked exactly like
the file. Relative file references (data files, ``path/to/file.py:attr`` verifiers and losses, pipeline stage
recipes) are resolved against the recipe's directory so a recipe works from any working directory.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kexaone_align.config.recipe import Recipe
from kexaone_align.config.schema import did_you_mean, locate
from kexaone_align.config.yamlio import dump_yaml, parse_scalar, read_yaml
from kexaone_align.errors import KexaoneError

_TYPE_TAGS = {"int", "float", "str", "bool", "none", "list", "dict", "literal", "tuple"}
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow", ".txt")
MAX_ERRORS = 12
# Cross-field validators name the key they blame as "key.path: message" (a validator cannot set `loc`).
_KEYED_MESSAGE = re.compile(r"^(?:Value error, )?([A-Za-z_][\w.]*): (.*)$", re.S)


def parse_override(text: str) -> tuple[str, Any]:
    """Split 'key.path=value' and parse the value as YAML."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise KexaoneError(f"bad override {text!r}: expected key.path=value, e.g. agapo.group_size=8")
    return key, parse_scalar(value)


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> tuple[dict[str, Any], set[str]]:
    """Return a copy of ``raw`` with the overrides applied, and the set of overridden key paths.

    Every key path is checked against the schema first; unknown paths are refused by name.
    """
    result = copy.deepcopy(raw)
    touched: set[str] = set()
    for text in overrides:
        key, value = parse_override(text)
        try:
            locate(Recipe, key)
        except KexaoneError as exc:
            raise KexaoneError(f"override {text!r}: {exc}") from None
        node: Any = result
        parts = key.split(".")
        for i, part in enumerate(parts):
            if isinstance(node, list):
                if not (part.isdigit() and int(part) < len(node)):
                    where = ".".join(parts[:i])
                    rest = parts[i + 1 :] if part.isdigit() else parts[i:]
                    example = ".".join([where, "0", *rest])
                    raise KexaoneError(
                        f"override {text!r}: {where} is a list of {len(node)} entries; "
                        f"give an index in range, e.g. {example}"
                    )
                part = int(part)  # list index
            elif i < len(parts) - 1 and not isinstance(node.get(part), dict | list):
                node[part] = {}
            if i == len(parts) - 1:
                node[part] = value
            else:
                node = node[part]
        touched.add(key)
    return result, touched


def _loc_path(loc: Sequence[Any]) -> str:
    parts = []
    for item in loc:
        text = str(item)
        if text.lower() in _TYPE_TAGS or "[" in text or text.startswith("function-"):
            continue
        parts.append(text)
    return ".".join(parts)


def _describe(err: dict[str, Any], path: str) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        parent_path = path.rsplit(".", 1)[0] if "." in path else ""
        try:
            section = locate(Recipe, parent_path).section if parent_path else Recipe
            allowed = list(section.model_fields) if section else []
        except KexaoneError:
            allowed = []
        last = path.rsplit(".", 1)[-1]
        hint = did_you_mean(last, allowed)
        return f"unknown key{hint}" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
    if kind == "missing":
        return "required key is missing"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if "input" in err and kind not in ("model_type", "dict_type") and not kind.startswith("value_error"):
        value = err["input"]
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        msg = f"{msg} (got {shown}: {type(value).__name__})"
    return msg


def format_validation_error(
    exc: ValidationError, source: str, lines: dict[tuple[str, ...], int], overridden: set[str]
) -> str:
    """One-screen message: file, then one line per bad key path with what was expected."""
    errors = exc.errors()
    out = [f"{source}: invalid recipe ({len(errors)} problem{'s' if len(errors) != 1 else ''}):"]
    for err in errors[:MAX_ERRORS]:
        path = _loc_path(err["loc"])
        err = dict(err)
        match = _KEYED_MESSAGE.match(err["msg"])
        if match:
            candidate = ".".join(p for p in (path, match.group(1)) if p)
            try:
                locate(Recipe, candidate)
                path, err["msg"] = candidate, match.group(2)
            except KexaoneError:
                pass
        parts = tuple(path.split(".")) if path else ()
        where = ""
        if path in overridden or any(path.startswith(o + ".") for o in overridden):
            where = " (from override)"
        else:
            for n in range(len(parts), 0, -1):
                if parts[:n] in lines:
                    where = f" (line {lines[parts[:n]]})"
                    break
        out.append(f"  {path or '<recipe>'}{where}: {_describe(err, path)}")
    if len(errors) > MAX_ERRORS:
        out.append(f"  ... and {len(errors) - MAX_ERRORS} more")
    return "\n".join(out)


def _resolve_relative(value: str, base: Path) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _absolute_file_ref(
    block: dict[str, Any], key: str, base: Path, where: str, kind: str, problems: list[str]
) -> None:
    """Make a ``path/to/file.py:attr`` reference at ``block[key]`` absolute (a missing file is a problem)."""
    ref = block.get(key)
    if not (isinstance(ref, str) and ".py:" in ref):
        return
    file_part, _, attr = ref.rpartition(":")
    candidate = _resolve_relative(file_part, base)
    if not Path(candidate).is_file():
        problems.append(f"  {where}: {kind} file not found: {candidate}")
    else:
        block[key] = f"{candidate}:{attr}"


def _resolve_paths(raw: dict[str, Any], base: Path) -> tuple[list[str], list[str]]:
    """Make file references absolute.

    Returns (problems, warnings). A missing verifier file or stage recipe is a problem; a missing data
    file only a warning, because a cluster recipe names files that exist on the cluster, not here.
    """
    problems: list[str] = []
    warnings: list[str] = []
    data = raw.get("data")
    if isinstance(data, dict):
        for key in ("train_files", "eval_files"):
            files = data.get(key)
            if not isinstance(files, list):
                continue
            for i, item in enumerate(files):
                if not isinstance(item, str):
                    continue
                looks_local = item.startswith((".", "/", "~")) or item.endswith(_FILE_SUFFIXES)
                candidate = _resolve_relative(item, base)
                exists = Path(candidate).exists()
                if exists or looks_local:  # anything else is taken for a hub dataset name
                    files[i] = candidate
                if looks_local and not exists:
                    warnings.append(f"data.{key}.{i}: not found on this machine: {candidate}")
    verifiers = raw.get("verifiers")
    if isinstance(verifiers, dict):
        for task in verifiers:
            _absolute_file_ref(verifiers, task, base, f"verifiers.{task}", "verifier", problems)
    for section in ("sft", "agapo", "grouper"):
        block = raw.get(section)
        if isinstance(block, dict):
            _absolute_file_ref(block, "loss", base, f"{section}.loss", "loss", problems)
    for section in ("model", "tokenizer"):
        block = raw.get(section)
        if isinstance(block, dict):
            for key in ("path", "chat_template"):
                value = block.get(key)
                if isinstance(value, str) and value.startswith((".", "~")):
                    block[key] = _resolve_relative(value, base)
    pipeline = raw.get("pipeline")
    if isinstance(pipeline, list):
        for i, entry in enumerate(pipeline):
            if isinstance(entry, dict) and isinstance(entry.get("recipe"), str):
                candidate = _resolve_relative(entry["recipe"], base)
                if not Path(candidate).is_file():
                    problems.append(f"  pipeline.{i}.recipe: stage recipe not found: {candidate}")
                entry["recipe"] = candidate
    return problems, warnings


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override, validate. Raises KexaoneError naming the file and each bad key path."""
    path = Path(path)
    raw, lines = read_yaml(path)
    raw, overridden = apply_overrides(raw, overrides)
    problems, warnings = _resolve_paths(raw, path.resolve().parent)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        message = format_validation_error(exc, str(path), lines, overridden)
        raise KexaoneError("\n".join([message, *problems])) from None
    if problems:
        raise KexaoneError("\n".join([f"{path}: invalid recipe:", *problems]))
    recipe._source = path.resolve()
    recipe._warnings = [*warnings, *layout_warnings(recipe)]
    return recipe


def layout_warnings(recipe: Recipe) -> list[str]:
    """Valid but likely slow layouts: learner threads beyond their reserved cores while rollouts overlap."""
    threads, roll = recipe.learners.threads, recipe.rollout
    overlapped = recipe.stage == "agapo" and roll.max_staleness >= 1
    if threads is not None and overlapped and threads > recipe.cluster.cpus_per_actor:
        return [
            f"learners.threads: {threads} threads per learner with {recipe.cluster.cpus_per_actor} CPU(s) "
            "reserved while rollouts overlap training (rollout.max_staleness >= 1): the learner and the "
            "rollout workers compete for the same cores"
        ]
    return []


def load_pipeline_stages(recipe: Recipe) -> list[Recipe]:
    """Load every stage recipe of a pipeline (with its overrides), validated.

    Each stage's run_dir defaults to <pipeline run_dir>/<index>_<stage>; the pipeline's own ``model``
    and ``tokenizer``, when given, replace the first stage's (later stages start from the previous
    stage's export, which the pipeline runner wires in).
    """
    if recipe.stage != "pipeline" or not recipe.pipeline:
        raise KexaoneError("load_pipeline_stages needs a recipe with stage 'pipeline'")
    stages: list[Recipe] = []
    root = recipe.resolved_run_dir
    for i, entry in enumerate(recipe.pipeline):
        try:
            stage = load_recipe(entry.recipe, entry.overrides)
        except KexaoneError as exc:
            raise KexaoneError(f"pipeline stage {i} ({entry.recipe}):\n{exc}") from None
        if stage.stage == "pipeline":
            raise KexaoneError(
                f"pipeline stage {i} ({entry.recipe}) is itself a pipeline; nesting is not supported"
            )
        updates: dict[str, Any] = {}
        if not any(o.split("=", 1)[0].strip() == "run_dir" for o in entry.overrides):
            updates["run_dir"] = str(root / f"{i:02d}_{stage.stage}")
        if i == 0 and recipe.model is not None:
            updates["model"] = recipe.model.model_dump(mode="json")
            updates["tokenizer"] = recipe.tokenizer.model_dump(mode="json")
        if updates:  # re-validated: the pipeline's model must suit the stage's layout too
            source, warnings = stage.source_path, stage.warnings
            try:
                # exclude_unset: fields the stage recipe left unset stay unset (stage defaults apply)
                given = stage.model_dump(mode="json", exclude_unset=True)
                stage = Recipe.model_validate({**given, **updates})
            except ValidationError as exc:
                where = f"{entry.recipe} (pipeline stage {i}, with the pipeline's model)"
                raise KexaoneError(format_validation_error(exc, where, {}, set())) from None
            stage._source, stage._warnings = source, warnings
        stages.append(stage)
    return stages


def start_from_checkpoint(recipe: Recipe, checkpoint_dir: str | Path) -> Recipe:
    """A copy of a stage recipe whose policy (and tokenizer) load from an exported checkpoint.

    This is how a pipeline chains stages: stage i+1 starts from stage i's Hugging Face export.
    ``model.architecture`` is kept for ``plan``; the checkpoint's config.json is what loads.
    """
    if recipe.model is None:
        raise KexaoneError("start_from_checkpoint needs a stage recipe with a model section")
    # Only what the recipe set: re-validating then fills the same defaults and keeps "unset" meaning
    # "the stage's own default" (e.g. RL prompts in reasoning mode unless data.reasoning_fraction is set).
    data = recipe.model_dump(mode="json", exclude_unset=True)
    data.setdefault("model", {}).update(source="pretrained", path=str(checkpoint_dir))
    data.setdefault("tokenizer", {}).update(source="pretrained", path=None)
    try:
        chained = Recipe.model_validate(data)
    except ValidationError as exc:
        raise KexaoneError(format_validation_error(exc, str(recipe.source_path), {}, set())) from None
    chained._source, chained._warnings = recipe.source_path, recipe.warnings
    return chained


def recipe_to_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe (defaults filled in) as YAML, for recipe.resolved.yaml."""
    return dump_yaml(recipe.model_dump(mode="json"))
