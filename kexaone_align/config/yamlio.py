"""YAML reading with line numbers, and YAML 1.2-style floats.

PyYAML follows YAML 1.1, where ``1e-5`` is a *string*; with strict validation that would reject the most
common way of writing a learning rate, so the loader here also resolves exponent floats without a dot.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from kexaone_align.errors import KexaoneError


class RecipeLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-5`` / ``3E4`` as floats."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_scalar(text: str) -> Any:
    """Parse an override value as YAML (``8`` -> int, ``[1, 2]`` -> list, ``eight`` -> str)."""
    try:
        return yaml.load(text, Loader=RecipeLoader) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise KexaoneError(f"cannot parse override value {text!r} as YAML: {exc}") from None


def _line_map(node: yaml.Node, path: tuple[str, ...], out: dict[tuple[str, ...], int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = (*path, str(key_node.value))
            line = key_node.start_mark.line + 1
            if key in out:  # PyYAML would silently keep the last one
                raise KexaoneError(
                    f"duplicate key '{'.'.join(key)}' at line {line} (first defined at line {out[key]})"
                )
            out[key] = line
            _line_map(value_node, key, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            key = (*path, str(i))
            out[key] = item.start_mark.line + 1
            _line_map(item, key, out)


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    """Read a recipe file: its mapping and a map from key path to line number.

    Raises KexaoneError naming the file (and line/column for syntax errors).
    """
    if not path.exists():
        raise KexaoneError(f"recipe file not found: {path}")
    if path.is_dir():
        raise KexaoneError(f"recipe path is a directory, not a YAML file: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text, Loader=RecipeLoader)
        data = yaml.load(text, Loader=RecipeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = exc.problem or exc.context or "syntax error"
        raise KexaoneError(f"{path}: YAML syntax error at {where}: {problem}") from None
    except yaml.YAMLError as exc:
        raise KexaoneError(f"{path}: YAML error: {exc}") from None
    if data is None:
        raise KexaoneError(f"{path}: the recipe is empty")
    if not isinstance(data, dict):
        raise KexaoneError(f"{path}: a recipe must be a mapping of sections, got a {type(data).__name__}")
    lines: dict[tuple[str, ...], int] = {}
    if node is not None:
        try:
            _line_map(node, (), lines)
        except KexaoneError as exc:
            raise KexaoneError(f"{path}: {exc}") from None
    return data, lines


def dump_yaml(data: dict[str, Any]) -> str:
    """YAML text of a plain mapping, keys in declaration order."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, allow_unicode=True)
