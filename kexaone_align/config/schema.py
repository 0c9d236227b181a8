"""Walking the recipe schema by dotted key path (for overrides and ``validate --explain``)."""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from kexaone_align.errors import KexaoneError


def _strip_optional(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def as_model(annotation: Any) -> type[BaseModel] | None:
    annotation = _strip_optional(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def did_you_mean(word: str, choices: list[str]) -> str:
    """' (did you mean X?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def type_name(annotation: Any) -> str:
    """A readable type, e.g. 'int | None', 'list[str]', "'hf' | 'vllm'"."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"section ({annotation.__name__})"
    return getattr(annotation, "__name__", str(annotation))


@dataclass(frozen=True)
class FieldHelp:
    """What `validate --explain` prints about one key."""

    path: str
    type: str
    default: str
    description: str
    constraints: str
    subkeys: list[str]

    def render(self) -> str:
        """Human-readable multi-line text."""
        lines = [f"{self.path}", f"  type:        {self.type}", f"  default:     {self.default}"]
        if self.constraints:
            lines.append(f"  constraints: {self.constraints}")
        lines.append(f"  {self.description}")
        if self.subkeys:
            lines.append(f"  keys: {', '.join(self.subkeys)}")
        return "\n".join(lines)


def _default_text(info: FieldInfo) -> str:
    if info.default is not PydanticUndefined:
        return repr(info.default)
    if info.default_factory is not None:
        try:
            value = info.default_factory()  # type: ignore[call-arg]
        except TypeError:
            return "(computed)"
        if isinstance(value, BaseModel):
            return "(section defaults)"
        return repr(value)
    return "(required)"


def _constraints_text(info: FieldInfo) -> str:
    parts = []
    for meta in info.metadata:
        for attr, sym in (
            ("gt", ">"),
            ("ge", ">="),
            ("lt", "<"),
            ("le", "<="),
            ("min_length", "min length"),
            ("max_length", "max length"),
        ):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sym} {value}")
    return ", ".join(parts)


@dataclass(frozen=True)
class Located:
    """Where a key path lands in the schema."""

    owner: type[BaseModel] | None  # None for a free-form key of a dict (e.g. verifiers.math)
    info: FieldInfo | None
    annotation: Any

    @property
    def section(self) -> type[BaseModel] | None:
        """The section class at this path, if the path names a section."""
        return as_model(self.annotation)


def locate(root: type[BaseModel], dotted: str) -> Located:
    """Check that a dotted key path exists in the schema; raises KexaoneError naming the bad part."""
    parts = [p for p in dotted.split(".")]
    if not dotted or any(not p for p in parts):
        raise KexaoneError(f"bad key path {dotted!r}: expected dotted keys such as 'agapo.group_size'")
    model: type[BaseModel] | None = root
    annotation: Any = None
    info: FieldInfo | None = None
    owner: type[BaseModel] | None = None
    for i, part in enumerate(parts):
        where = ".".join(parts[:i]) or "the recipe"
        if model is not None:
            fields = model.model_fields
            if part not in fields:
                raise KexaoneError(
                    f"unknown key '{'.'.join(parts[: i + 1])}': {where} has no key '{part}'"
                    f"{did_you_mean(part, list(fields))}; allowed: {', '.join(fields)}"
                )
            owner, info = model, fields[part]
            annotation = _strip_optional(info.annotation)
        else:
            bare = _strip_optional(annotation)
            origin = typing.get_origin(bare)
            if origin is dict:
                owner, info = None, None
                annotation = typing.get_args(bare)[1]
            elif origin is list and part.isdigit():
                owner, info = None, None
                annotation = typing.get_args(bare)[0]
            elif origin is list:
                annotation = typing.get_args(bare)[0]
                sub = as_model(annotation)
                if sub is None or part not in sub.model_fields:
                    raise KexaoneError(f"unknown key '{dotted}': {where} is a list")
                owner, info = sub, sub.model_fields[part]
                annotation = _strip_optional(info.annotation)
            else:
                raise KexaoneError(
                    f"unknown key '{dotted}': {where} is a value ({type_name(bare)}), not a section"
                )
        model = as_model(annotation)
    return Located(owner, info, annotation)


def explain(root: type[BaseModel], dotted: str) -> FieldHelp:
    """Description, type, default and constraints of one key of the recipe schema."""
    info = locate(root, dotted).info
    if info is None:
        return FieldHelp(
            dotted, "free-form key of a mapping", "-", "An entry of a user-named mapping.", "", []
        )
    sub = as_model(info.annotation)
    return FieldHelp(
        path=dotted,
        type=type_name(info.annotation),
        default=_default_text(info),
        description=info.description or "(no description)",
        constraints=_constraints_text(info),
        subkeys=list(sub.model_fields) if sub else [],
    )
