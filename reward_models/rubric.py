"""Rubrics for the generative (LLM-judge) reward: weighted dimensions, a score scale and a prompt template.

A rubric lives in a YAML file (name, description, scale, dimensions, template file name) and the judge
prompt in a text template next to it, so a team changes what the judge looks for without touching code.
Templates use ``string.Template`` ``$placeholders`` because judge prompts are full of literal JSON braces.
A template may hold a system and a user message, introduced by lines ``<<<system>>>`` and ``<<<user>>>``;
without markers the whole text is the user message.

Placeholders: ``$prompt $response $reference $rubric_name $rubric_description $dimensions
$dimension_names $scale_min $scale_max $example``.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from kexaone_align.errors import KexaoneError

BUILTIN_RUBRICS = ("chat_helpfulness", "safety", "instruction_following", "creative_writing", "tool_use")
DEFAULT_TEMPLATE = "judge_default.md"
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_ROLE_MARKER_RE = re.compile(r"^<<<(system|user)>>>[ \t]*$", re.MULTILINE)


@dataclass(frozen=True)
class RubricDimension:
    """One thing the judge scores; ``weight`` is its share of the reward (weights are renormalised)."""

    name: str
    description: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise KexaoneError(
                f"rubric dimension name {self.name!r} must start with a letter and use only letters, "
                "digits and '_' (the judge writes it back as a JSON key)"
            )
        try:
            weight = float(self.weight)
        except (TypeError, ValueError):
            raise KexaoneError(
                f"rubric dimension {self.name!r}: weight {self.weight!r} is not a number"
            ) from None
        if not weight > 0 or weight == float("inf"):
            raise KexaoneError(f"rubric dimension {self.name!r}: weight must be > 0, got {self.weight!r}")
        object.__setattr__(self, "weight", weight)


@dataclass(frozen=True)
class Rubric:
    """Dimensions scored on the integer scale ``[scale_min, scale_max]`` and the prompt that asks for them."""

    dimensions: tuple[RubricDimension, ...]
    scale_min: float = 1
    scale_max: float = 10
    name: str = "rubric"
    description: str = ""
    template: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        dims = tuple(self.dimensions)
        if not dims:
            raise KexaoneError(f"rubric {self.name!r} has no dimensions")
        if not all(isinstance(d, RubricDimension) for d in dims):
            raise KexaoneError(f"rubric {self.name!r}: dimensions must be RubricDimension objects")
        names = [d.name.lower() for d in dims]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise KexaoneError(f"rubric {self.name!r} repeats dimension name(s): {', '.join(dupes)}")
        if not float(self.scale_min) < float(self.scale_max):
            raise KexaoneError(
                f"rubric {self.name!r}: scale_min ({self.scale_min}) must be below "
                f"scale_max ({self.scale_max})"
            )
        object.__setattr__(self, "dimensions", dims)
        if not self.template:
            object.__setattr__(self, "template", read_template(DEFAULT_TEMPLATE))
        _check_template(self.template, self.name)

    @property
    def total_weight(self) -> float:
        return sum(d.weight for d in self.dimensions)

    def normalise(self, score: float) -> float:
        """Map a score on the rubric scale to [0, 1] (``scale_min`` -> 0, ``scale_max`` -> 1)."""
        lo, hi = float(self.scale_min), float(self.scale_max)
        return min(1.0, max(0.0, (float(score) - lo) / (hi - lo)))

    def render(self, prompt: Any, response: str, reference: Any = None) -> list[dict[str, str]]:
        """The chat messages sent to the judge for one response."""
        values = {
            "prompt": format_prompt(prompt),
            "response": response,
            "reference": "" if reference is None else _to_text(reference),
            "rubric_name": self.name,
            "rubric_description": self.description,
            "dimensions": "\n".join(f"- {d.name}: {d.description}" for d in self.dimensions),
            "dimension_names": ", ".join(d.name for d in self.dimensions),
            "scale_min": _fmt_number(self.scale_min),
            "scale_max": _fmt_number(self.scale_max),
            "example": json.dumps({d.name: int(self.scale_max) for d in self.dimensions}),
        }
        messages = []
        for role, text in _split_roles(self.template):
            content = string.Template(text).safe_substitute(values).strip()
            if content:
                messages.append({"role": role, "content": content})
        return messages


def _fmt_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _to_text(obj: Any) -> str:
    return obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, default=str)


def format_prompt(prompt: Any) -> str:
    """Render a prompt (text, or chat messages) as plain text for inclusion in a judge prompt."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list | tuple) and all(isinstance(m, dict) for m in prompt):
        lines = []
        for m in prompt:
            content = m.get("content")
            text = content if isinstance(content, str) else _to_text(content)
            if m.get("tool_calls"):
                text = f"{text}\n[tool calls] {_to_text(m['tool_calls'])}".strip()
            lines.append(f"[{m.get('role', 'user')}] {text}")
        return "\n".join(lines)
    return _to_text(prompt)


def _split_roles(template: str) -> list[tuple[str, str]]:
    parts = _ROLE_MARKER_RE.split(template)
    if len(parts) == 1:
        return [("user", template)]
    out = []
    if parts[0].strip():
        out.append(("user", parts[0]))
    out.extend((parts[i], parts[i + 1]) for i in range(1, len(parts) - 1, 2))
    return out


def _check_template(template: str, rubric_name: str) -> None:
    try:
        ids = set()
        for _, text in _split_roles(template):
            ids |= set(string.Template(text).get_identifiers())
    except ValueError as exc:
        raise KexaoneError(f"rubric {rubric_name!r}: bad judge template: {exc}") from None
    if "response" not in ids:
        raise KexaoneError(f"rubric {rubric_name!r}: the judge template never shows $response to the judge")


def read_template(name: str) -> str:
    """Text of a template shipped in ``reward_models/templates``."""
    res = resources.files("kexaone_align.reward_models").joinpath("templates", name)
    if not res.is_file():
        raise KexaoneError(f"no built-in judge template named {name!r}")
    return res.read_text(encoding="utf-8")


def rubric_from_dict(data: dict[str, Any], *, base_dir: Path | None = None) -> Rubric:
    """Build a rubric from the parsed YAML mapping; ``template`` is a file relative to ``base_dir``."""
    if not isinstance(data, dict):
        raise KexaoneError(f"a rubric must be a mapping, got {type(data).__name__}")
    known = {"name", "description", "scale_min", "scale_max", "template", "template_text", "dimensions"}
    unknown = sorted(set(data) - known)
    name = str(data.get("name", "rubric"))
    if unknown:
        raise KexaoneError(
            f"rubric {name!r}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )
    raw_dims = data.get("dimensions")
    if not isinstance(raw_dims, list) or not raw_dims:
        raise KexaoneError(f"rubric {name!r}: 'dimensions' must be a non-empty list")
    dims = []
    for i, d in enumerate(raw_dims):
        if not isinstance(d, dict) or "name" not in d:
            raise KexaoneError(f"rubric {name!r}: dimension #{i} must be a mapping with a 'name'")
        extra = sorted(set(d) - {"name", "description", "weight"})
        if extra:
            raise KexaoneError(
                f"rubric {name!r}: dimension {d['name']!r} has unknown key(s) {', '.join(extra)}"
            )
        dims.append(RubricDimension(str(d["name"]), str(d.get("description", "")), d.get("weight", 1.0)))
    template = data.get("template_text") or ""
    if not template and data.get("template"):
        template = _load_template_file(str(data["template"]), base_dir, name)
    return Rubric(
        dimensions=tuple(dims),
        scale_min=_number(data.get("scale_min", 1), "scale_min", name),
        scale_max=_number(data.get("scale_max", 10), "scale_max", name),
        name=name,
        description=str(data.get("description", "") or ""),
        template=template,
    )


def _number(value: Any, key: str, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise KexaoneError(f"rubric {name!r}: {key} must be a number, got {value!r}") from None


def _load_template_file(ref: str, base_dir: Path | None, name: str) -> str:
    if base_dir is not None and (base_dir / ref).is_file():
        return (base_dir / ref).read_text(encoding="utf-8")
    if Path(ref).is_absolute() and Path(ref).is_file():
        return Path(ref).read_text(encoding="utf-8")
    try:
        return read_template(ref)
    except KexaoneError:
        raise KexaoneError(f"rubric {name!r}: judge template file {ref!r} not found") from None


def load_rubric(source: str | Path) -> Rubric:
    """A rubric from a YAML file path, or a built-in by name (see ``BUILTIN_RUBRICS``)."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise KexaoneError(f"rubric file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise KexaoneError(f"rubric file {str(path)!r} is not valid YAML: {exc}") from None
        return rubric_from_dict(data, base_dir=path.parent)
    name = str(source)
    if name not in BUILTIN_RUBRICS:
        raise KexaoneError(
            f"no rubric file or built-in rubric named {name!r} (built-ins: {', '.join(BUILTIN_RUBRICS)})"
        )
    text = (
        resources.files("kexaone_align.reward_models")
        .joinpath("templates", f"{name}.yaml")
        .read_text("utf-8")
    )
    return rubric_from_dict(yaml.safe_load(text))
