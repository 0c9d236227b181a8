"""Writing stateful tool environments with an LLM, and filtering out the ones that are broken, unsolvable or
unrealistic (imported as ``kexaone_align.environments.generate``; CLI: ``kexaone-align envgen``).

A *writer* (any judge backend: ``complete(messages) -> text``) is shown the data-file format (the
built-in ``orders`` file as the example) and a theme, and answers with one environment as JSON whose tasks
each carry a reference ``solution``: the tool calls that do the task and a final answer. Every answer
then goes through the same checks, in order:

1. it is one JSON object that ``DataEnvironment`` loads (the loader every episode uses);
2. per task: the solution's calls, replayed with ``run_tool_call`` from a fresh state, all succeed, and
   the environment scores the solution's answer on the resulting state as passed (the task is solvable);
   the task does not pass on the untouched state with an empty answer (it asks for something);
3. an LLM *judge* (optional, any judge backend) reads the environment and returns
   ``{"accept": bool, "reason": str, "bad_tasks": [task ids]}``: it rejects unrealistic environments and
   names unrealistic or ambiguous tasks.

Tasks that fail a check are dropped; an environment with no task left is rejected. Accepted environments
are written as ``<name>.json`` (solutions kept: they are valid tool-use traces) and load with
``resolve_environment("path/<name>.json")`` like any hand-written file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kexaone_align.environments.api import ToolCall, ToolLimits
from kexaone_align.environments.session import run_tool_call, score_episode
from kexaone_align.environments.stateful import DataEnvironment, rows_from_environment

from kexaone_align.errors import KexaoneError

WRITER_SYSTEM = (
    "You design small, realistic, deterministic tool-use environments for training an assistant. "
    "Answer with exactly one JSON object and nothing else."
)
FORMAT_NOTES = """An environment is a JSON object with:
- "name" (lowercase letters, digits, '_'), "description";
- "state": {table: {record key: {field: value}}}, a few tables of a few records each;
- "tools": a list of {"name", "description", "op", "table", ...} where op "get" needs "key" (the argument
  naming the record), op "find" needs "match" (a list of fields compared with the arguments), op "set" needs
  "key" and "set" ({field: value or "$argument"}) and may have "require" ({field: [allowed values]});
- "tasks": a list of {"id", "prompt", "expect", "solution"} where "expect" holds "state" (a list of
  {"table", "key", "field", "equals"} checked on the final state), "unchanged_otherwise" (true: nothing
  else may change) and "answer_contains" (phrases the final answer must contain), and "solution" is
  {"calls": [{"name": tool, "arguments": {...}}], "answer": the final answer text} that passes the task.
Every argument value is a string. Tasks must be solvable with the tools and need at least one tool call."""
JUDGE_SYSTEM = (
    "You review generated tool-use environments for training an assistant. Reject an environment that is "
    "unrealistic, inconsistent or whose tasks cannot be done with its tools. Answer with one JSON object: "
    '{"accept": true or false, "reason": "...", "bad_tasks": [ids of tasks that are unrealistic, ambiguous '
    "or unsolvable]}."
)
_NAME_RE = re.compile(r"[^a-z0-9_]+")
_FENCE_RE = re.compile(r"^```(?:json)?\s*|\s*```$")


@dataclass
class Verdict:
    """What became of one writer answer: the accepted spec (None when rejected) and why tasks were dropped."""

    theme: str
    spec: dict[str, Any] | None
    reason: str = ""
    dropped: dict[str, str] = field(default_factory=dict)  # task id -> why
    path: str | None = None


def writer_messages(theme: str, example: dict[str, Any]) -> list[dict[str, str]]:
    """The chat that asks the writer for one environment about ``theme``."""
    user = (
        f"{FORMAT_NOTES}\n\nAn example environment (without solutions):\n{json.dumps(example)}\n\n"
        f"Write a new environment about: {theme}. Give it 3 to 5 tasks, each with its solution."
    )
    return [{"role": "system", "content": WRITER_SYSTEM}, {"role": "user", "content": user}]


def judge_messages(spec: dict[str, Any]) -> list[dict[str, str]]:
    """The chat that asks the judge for its verdict on one (checked) environment."""
    shown = {k: spec.get(k) for k in ("name", "description", "state", "tools", "tasks")}
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": json.dumps(shown)}]


def json_object(text: Any) -> dict[str, Any] | None:
    """The JSON object in ``text`` (whole, fenced, or between its first ``{`` and last ``}``), else None."""
    if not isinstance(text, str):
        return None
    body = _FENCE_RE.sub("", text.strip())
    for candidate in (body, body[body.find("{") : body.rfind("}") + 1]):
        try:
            obj = json.loads(candidate)
        except (json.JSONDecodeError, ValueError):
            continue
        if isinstance(obj, dict):
            return obj
    return None


def _solution_fails(env: DataEnvironment, task: dict[str, Any], limits: ToolLimits) -> str | None:
    """Why ``task``'s reference solution does not show it solvable (None when it does)."""
    from kexaone_align.data.prompts import parse_prompt_row

    solution = task.get("solution")
    if not isinstance(solution, dict) or not isinstance(solution.get("calls"), list):
        return "no reference solution ({'calls': [...], 'answer': ...})"
    if not solution["calls"]:
        return "the solution makes no tool call"
    if not isinstance(solution.get("answer"), str):
        return "the solution has no string 'answer'"
    (raw,) = [r for r in rows_from_environment(env) if r["reference"] == task["id"]]
    row = parse_prompt_row(raw, f"task {task['id']}")
    names = {t["function"]["name"] for t in env.tools(row)}
    untouched = score_episode(env, env.reset(row), row, "", limits)
    if untouched.passed:
        return "the task passes without any tool call or answer"
    state = env.reset(row)
    for i, call in enumerate(solution["calls"]):
        if not isinstance(call, dict) or not isinstance(call.get("arguments", {}), dict):
            return f"solution call {i} is not {{'name': ..., 'arguments': {{...}}}}"
        parsed = ToolCall(str(call.get("name", "")), call.get("arguments", {}))
        outcome = run_tool_call(env, state, parsed, names, limits)
        if outcome.error:
            return f"solution call {i} fails: {outcome.content}"
        state = outcome.state
    score = score_episode(env, state, row, solution["answer"], limits)
    if not score.passed:
        return f"the solution does not pass: {score.details}"
    return None


def check_environment(
    text: Any, theme: str, *, limits: ToolLimits | None = None, judge_text: Any = None
) -> Verdict:
    """Structural and solvability checks of one writer answer (steps 1-2); with ``judge_text`` (the
    judge's answer about the checked environment) also step 3."""
    limits = limits or ToolLimits()
    spec = json_object(text)
    if spec is None:
        return Verdict(theme, None, "the writer's answer is not a JSON object")
    try:
        env = DataEnvironment(spec, f"generated ({theme})")
    except KexaoneError as exc:
        return Verdict(theme, None, f"does not load: {exc}")
    if not env.tasks:
        return Verdict(theme, None, "has no tasks")
    verdict = Verdict(theme, None)
    kept, seen = [], set()
    for task in spec["tasks"]:
        if task["id"] in seen:
            verdict.dropped[f"{task['id']} (again)"] = "a second task with this id"
            continue
        seen.add(task["id"])
        why = _solution_fails(env, task, limits)
        if why is None:
            kept.append(task)
        else:
            verdict.dropped[task["id"]] = why
    if not kept:
        verdict.reason = "no task is solvable by its reference solution"
        return verdict
    verdict.spec = {**spec, "tasks": kept}
    if judge_text is not None:
        apply_judge(verdict, judge_text)
    return verdict


def apply_judge(verdict: Verdict, judge_text: Any) -> None:
    """Step 3 on a verdict that passed steps 1-2: reject or drop tasks as the judge's answer says."""
    opinion = json_object(judge_text)
    if opinion is None or not isinstance(opinion.get("accept"), bool):
        verdict.spec, verdict.reason = None, "the judge's verdict is not readable JSON with 'accept'"
        return
    if not opinion["accept"]:
        verdict.spec, verdict.reason = None, f"judge: {opinion.get('reason', 'rejected')}"
        return
    bad = opinion.get("bad_tasks") or []
    bad = {str(b) for b in bad} if isinstance(bad, list) else set()
    tasks = [t for t in verdict.spec["tasks"] if t["id"] not in bad]
    for task_id in sorted(bad & {t["id"] for t in verdict.spec["tasks"]}):
        verdict.dropped[task_id] = f"judge: {opinion.get('reason', 'bad task')}"
    if not tasks:
        verdict.spec, verdict.reason = None, "the judge rejected every task"
    else:
        verdict.spec = {**verdict.spec, "tasks": tasks}


def _complete(backend: Any, batch: list[list], max_tokens: int, temperature: float) -> list[Any]:
    """One text per chat (an exception in place of a failed one), batched where the backend batches."""
    from kexaone_align.reward_models.backends.base import complete_each

    if getattr(backend, "batched", False) and callable(getattr(backend, "complete_batch", None)):
        try:
            return list(backend.complete_batch(batch, max_tokens=max_tokens, temperature=temperature))
        except Exception as exc:
            return [exc] * len(batch)
    return complete_each(backend, batch, max_tokens=max_tokens, temperature=temperature)


def _file_name(spec: dict[str, Any], taken: set[str]) -> str:
    base = _NAME_RE.sub("_", str(spec.get("name") or "env").lower()).strip("_") or "env"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    taken.add(name)
    return name


def generate_environments(
    writer: Any,
    themes: Sequence[str],
    out_dir: str | Path,
    *,
    judge: Any = None,
    per_theme: int = 1,
    max_tokens: int = 4096,
    temperature: float = 0.7,
    limits: ToolLimits | None = None,
) -> list[Verdict]:
    """Ask ``writer`` for ``per_theme`` environments per theme, check them (and have ``judge`` review the
    ones that pass), and write the accepted ones to ``out_dir`` as ``<name>.json``. Returns one verdict
    per answer; nothing a model writes raises."""
    from kexaone_align.environments import DATA_DIR

    if per_theme < 1 or not themes:
        raise KexaoneError("envgen needs at least one theme and per_theme >= 1")
    example = json.loads((DATA_DIR / "orders.json").read_text(encoding="utf-8"))
    asked = [t for t in themes for _ in range(per_theme)]
    texts = _complete(writer, [writer_messages(t, example) for t in asked], max_tokens, temperature)
    verdicts = [
        check_environment(None if isinstance(x, Exception) else x, t, limits=limits)
        for t, x in zip(asked, texts, strict=True)
    ]
    for v, x in zip(verdicts, texts, strict=True):
        if isinstance(x, Exception):
            v.reason = f"the writer failed: {type(x).__name__}: {x}"
    passed = [v for v in verdicts if v.spec is not None]
    if judge is not None and passed:
        opinions = _complete(judge, [judge_messages(v.spec) for v in passed], 1024, 0.0)
        for v, opinion in zip(passed, opinions, strict=True):
            apply_judge(v, None if isinstance(opinion, Exception) else opinion)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    taken = {p.stem for p in out.glob("*.json")}
    for v in verdicts:
        if v.spec is None:
            continue
        name = _file_name(v.spec, taken)
        v.spec["name"] = name
        DataEnvironment(v.spec, name)  # what is written loads (task filtering keeps it valid)
        path = out / f"{name}.json"
        path.write_text(json.dumps(v.spec, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        v.path = str(path)
    return verdicts


def report(verdicts: Sequence[Verdict]) -> dict[str, Any]:
    """A JSON-able summary: counts, the written files, every rejection and dropped task with its reason."""
    written = [v for v in verdicts if v.path]
    return {
        "answers": len(verdicts),
        "accepted": len(written),
        "rejected": len(verdicts) - len(written),
        "tasks_written": sum(len(v.spec["tasks"]) for v in written),
        "tasks_dropped": sum(len(v.dropped) for v in verdicts),
        "files": [v.path for v in written],
        "rejections": [{"theme": v.theme, "reason": v.reason} for v in verdicts if not v.path],
        "dropped": [
            {"theme": v.theme, "task": k, "reason": r} for v in verdicts for k, r in v.dropped.items()
        ],
    }
