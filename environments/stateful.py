"""Stateful tool environments described as data: tables of records, tools that read and change them,
and tasks whose pass criteria are checked on the final state and the answer.

A data file (JSON) holds::

    {"name": "orders", "description": "...",
     "state": {"<table>": {"<key>": {"<field>": value, ...}, ...}, ...},
     "tools": [{"name": "lookup_order", "description": "...", "op": "get", "table": "orders",
                "key": "order_id"},
               {"name": "find_orders", "op": "find", "table": "orders", "match": ["customer"]},
               {"name": "refund_order", "op": "set", "table": "orders", "key": "order_id",
                "set": {"status": "refunded", "note": "$reason"}, "require": {"status": ["delivered"]}}],
     "tasks": [{"id": "...", "prompt": "...",
                "expect": {"state": [{"table": "orders", "key": "A1", "field": "status",
                                      "equals": "refunded"}],
                           "unchanged_otherwise": true, "answer_contains": ["refunded"]}}]}

Operations: ``get`` (one record by key), ``find`` (records whose fields equal the arguments) and
``set`` (assign fields of one record; ``"$arg"`` takes an argument's value; ``require`` lists the values
a field must have before the change, or the call is refused with a ``ToolError``). Each tool's JSON
schema is derived from its operation unless the file gives ``parameters``. Every episode starts from a
deep copy of ``state``, so episodes never see each other. A prompt row names its task by ``reference``
(a task id, or an inline ``expect`` object); ``rows_from_environment`` turns a file's tasks into rows.
Other keys of a task (a generated file's reference ``solution``) are kept and not read here.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from kexaone_align.environments.api import Environment, EpisodeScore, ToolError

from kexaone_align.errors import KexaoneError

_OPS = ("get", "find", "set")
_TYPES = {"string": str, "number": (int, float), "integer": int, "boolean": bool}


def _bad(where: str, problem: str) -> KexaoneError:
    return KexaoneError(f"environment file {where}: {problem}")


class DataEnvironment(Environment):
    """A stateful tool environment loaded from a data file (see the module docstring)."""

    isolation = "inline"  # pure record operations on a copied dict; nothing to hang on

    def __init__(self, spec: dict[str, Any], where: str = "<dict>", path: str | None = None) -> None:
        self.where = where
        self.path = path
        if not isinstance(spec, dict):
            raise _bad(where, "must be a JSON object")
        self.name = spec.get("name") or Path(where).stem
        self.description = str(spec.get("description", ""))
        state = spec.get("state")
        if not isinstance(state, dict) or not all(isinstance(t, dict) for t in state.values()):
            raise _bad(where, "'state' must map table names to {key: record} objects")
        self.initial_state = state
        tools = spec.get("tools")
        if not isinstance(tools, list) or not tools:
            raise _bad(where, "'tools' must be a non-empty list")
        self.tool_specs = {t.get("name"): self._check_tool(i, t) for i, t in enumerate(tools)}
        tasks = spec.get("tasks", [])
        if not isinstance(tasks, list):
            raise _bad(where, "'tasks' must be a list")
        self.tasks: dict[str, dict[str, Any]] = {}
        for i, task in enumerate(tasks):
            if not isinstance(task, dict) or not isinstance(task.get("id"), str) or "prompt" not in task:
                raise _bad(where, f"tasks[{i}] needs a string 'id' and a 'prompt'")
            self._check_expect(f"tasks[{i}]", task.get("expect", {}))
            self.tasks[task["id"]] = task

    @classmethod
    def from_file(cls, path: str | Path) -> DataEnvironment:
        """Load and validate a data file; errors name the file and the entry."""
        path = Path(path)
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise _bad(path.name, f"cannot be read as JSON: {exc}") from None
        return cls(spec, path.name, str(path))

    # -- validation -------------------------------------------------------------------------------
    def _check_tool(self, i: int, tool: Any) -> dict[str, Any]:
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
            raise _bad(self.where, f"{where} needs a string 'name'")
        if tool.get("op") not in _OPS:
            raise _bad(self.where, f"{where}.op must be one of {list(_OPS)}, got {tool.get('op')!r}")
        if tool.get("table") not in self.initial_state:
            raise _bad(self.where, f"{where}.table {tool.get('table')!r} is not a table of 'state'")
        if tool["op"] in ("get", "set") and not isinstance(tool.get("key"), str):
            raise _bad(self.where, f"{where} ({tool['op']}) needs 'key', the argument naming the record")
        if tool["op"] == "find" and not (isinstance(tool.get("match"), list) and tool["match"]):
            raise _bad(self.where, f"{where} (find) needs 'match', a list of fields")
        if tool["op"] == "set" and not (isinstance(tool.get("set"), dict) and tool["set"]):
            raise _bad(self.where, f"{where} (set) needs 'set', the fields it assigns")
        return tool

    def _check_expect(self, where: str, expect: Any) -> None:
        if not isinstance(expect, dict):
            raise _bad(self.where, f"{where}.expect must be an object")
        for j, check in enumerate(expect.get("state", [])):
            if not isinstance(check, dict) or not {"table", "key", "field", "equals"} <= set(check):
                raise _bad(self.where, f"{where}.expect.state[{j}] needs table, key, field and equals")

    # -- the Environment contract -----------------------------------------------------------------
    def _arguments(self, tool: dict[str, Any]) -> dict[str, Any]:
        if tool["op"] == "find":
            return {f: {"type": "string"} for f in tool["match"]}
        args = {tool["key"]: {"type": "string"}}
        for value in tool.get("set", {}).values():
            if isinstance(value, str) and value.startswith("$"):
                args[value[1:]] = {"type": "string"}
        return args

    def _schema(self, tool: dict[str, Any]) -> dict[str, Any]:
        params = tool.get("parameters") or {
            "type": "object",
            "properties": self._arguments(tool),
            "required": sorted(self._arguments(tool)),
        }
        desc = tool.get("description") or f"{tool['op']} on {tool['table']}"
        fn = {"name": tool["name"], "description": desc, "parameters": params}
        return {"type": "function", "function": fn}

    def tools(self, row: Any) -> list[dict[str, Any]]:
        return [self._schema(t) for t in self.tool_specs.values()]

    def reset(self, row: Any) -> dict[str, Any]:
        return copy.deepcopy(self.initial_state)

    def call(self, state: dict[str, Any], name: str, arguments: dict[str, Any]) -> str:
        tool = self.tool_specs.get(name)
        if tool is None:
            raise ToolError(f"unknown tool {name!r}")
        params = self._schema(tool)["function"]["parameters"]
        for arg in params.get("required", []):
            if arg not in arguments:
                raise ToolError(f"{name}: missing argument {arg!r}")
        for arg, value in arguments.items():
            want = params.get("properties", {}).get(arg)
            if want is None:
                raise ToolError(f"{name}: unexpected argument {arg!r}")
            kind = _TYPES.get(want.get("type", ""))
            if kind is not None and not isinstance(value, kind):
                raise ToolError(f"{name}: argument {arg!r} must be a {want['type']}")
        table = state[tool["table"]]
        if tool["op"] == "find":
            match = tool["match"]
            hits = {k: r for k, r in table.items() if all(str(r.get(f)) == str(arguments[f]) for f in match)}
            return json.dumps(hits, sort_keys=True)
        key = str(arguments[tool["key"]])
        if key not in table:
            raise ToolError(f"{name}: no record {key!r} in {tool['table']}")
        record = table[key]
        if tool["op"] == "get":
            return json.dumps({key: record}, sort_keys=True)
        for field_name, allowed in tool.get("require", {}).items():
            allowed = allowed if isinstance(allowed, list) else [allowed]
            if record.get(field_name) not in allowed:
                raise ToolError(
                    f"{name}: refused, {key} has {field_name}={record.get(field_name)!r} "
                    f"(needs one of {allowed})"
                )
        for field_name, value in tool["set"].items():
            from_arg = isinstance(value, str) and value.startswith("$")
            record[field_name] = arguments[value[1:]] if from_arg else value
        return json.dumps({key: record}, sort_keys=True)

    def expectation(self, row: Any) -> dict[str, Any]:
        """The pass criteria of a row: its ``reference`` as a task id of this file, or an inline object."""
        ref = getattr(row, "reference", None)
        if isinstance(ref, dict):
            self._check_expect("reference", ref)
            return ref
        if isinstance(ref, str) and ref in self.tasks:
            return self.tasks[ref].get("expect", {})
        raise KexaoneError(f"environment {self.name!r}: row reference {ref!r} names no task of {self.where}")

    def score(self, state: dict[str, Any], row: Any, answer: str) -> EpisodeScore:
        """Pass (1.0) when every expected field holds, nothing else changed (if asked) and the answer
        contains every expected phrase (case-insensitive); else 0 with the failed checks."""
        expect = self.expectation(row)
        failed = []
        touched = set()
        for check in expect.get("state", []):
            table, key, field_name = check["table"], str(check["key"]), check["field"]
            touched.add((table, key, field_name))
            got = state.get(table, {}).get(key, {}).get(field_name)
            if got != check["equals"]:
                failed.append(f"{table}.{key}.{field_name} is {got!r}, expected {check['equals']!r}")
        if expect.get("unchanged_otherwise"):
            for table, records in self.initial_state.items():
                for key, record in records.items():
                    for field_name, value in record.items():
                        now = state.get(table, {}).get(key, {}).get(field_name)
                        if (table, key, field_name) not in touched and now != value:
                            failed.append(f"{table}.{key}.{field_name} changed to {now!r}")
        lowered = (answer or "").lower()
        for phrase in expect.get("answer_contains", []):
            if str(phrase).lower() not in lowered:
                failed.append(f"the answer does not mention {phrase!r}")
        return EpisodeScore(0.0 if failed else 1.0, not failed, {"failed": failed})


def rows_from_environment(env: DataEnvironment, environment_ref: str | None = None) -> list[dict[str, Any]]:
    """Prompt rows (dicts for ``load_prompt_set``) for every task of a data environment."""
    ref = environment_ref or env.path or env.name
    rows = []
    for task_id, task in env.tasks.items():
        prompt = task["prompt"]
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        row = {"id": f"{env.name}-{task_id}", "messages": messages, "task": env.name}
        rows.append({**row, "environment": ref, "reference": task_id})
    return rows
