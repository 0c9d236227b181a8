"""Executing what the policy asked for, inside the bounds of ``ToolLimits``.

``parse_tool_calls`` reads the ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks of an
assistant turn (malformed ones come back with ``error`` set, never raise). ``run_tool_call`` runs one
call and always returns a :class:`ToolOutcome`: a malformed call, an unknown tool, a ``ToolError``, any
other exception, a timeout and an over-long output all become a tool result the policy reads (errors
prefixed ``error:``), and are counted. ``score_episode`` turns the environment's verdict into an
``EpisodeScore``, 0 when scoring fails.

``isolation = "process"`` environments run each call (and the final scoring) in a forked child in its
own process group; at the time limit the whole group is killed, so a hung tool leaves nothing running.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
import signal
import time
from dataclasses import dataclass
from typing import Any

from kexaone_align.environments.api import EpisodeScore, ToolCall, ToolError, ToolLimits

_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
_THINK_RE = re.compile(r"^.*</think>", re.S)


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every ``<tool_call>`` block of ``text`` in order; an unclosed block is a malformed call."""
    calls: list[ToolCall] = []
    body_text = _THINK_RE.sub("", text)  # calls written inside the reasoning do not count
    for match in _CALL_RE.finditer(body_text):
        raw = match.group(1).strip()
        calls.append(_parse_one(raw))
    rest = _CALL_RE.sub("", body_text)
    if "<tool_call>" in rest:
        raw = rest[rest.index("<tool_call>") :]
        calls.append(ToolCall("", {}, raw, "malformed tool call: <tool_call> is never closed"))
    return calls


def _parse_one(raw: str) -> ToolCall:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        return ToolCall("", {}, raw, f"malformed tool call: not valid JSON ({exc.msg})")
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return ToolCall("", {}, raw, "malformed tool call: expected an object with a string 'name'")
    args = obj.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return ToolCall(obj["name"], {}, raw, "malformed tool call: 'arguments' is not a JSON object")
    if not isinstance(args, dict):
        return ToolCall(obj["name"], {}, raw, "malformed tool call: 'arguments' must be an object")
    return ToolCall(obj["name"], args, raw)


def final_answer(text: str) -> str:
    """The answer part of an assistant turn: reasoning and tool-call blocks removed."""
    return _CALL_RE.sub("", _THINK_RE.sub("", text)).strip()


@dataclass
class ToolOutcome:
    """What one call produced: the text the policy reads, whether it failed, and the state after it."""

    content: str
    error: bool
    seconds: float
    state: Any
    timed_out: bool = False


def truncate(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, saying how much was dropped."""
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[output truncated: {len(text) - limit} more characters]"


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return str(value)


def _invoke(env: Any, state: Any, name: str, arguments: dict[str, Any], limit: int) -> tuple[str, Any, Any]:
    """(kind, payload, state) for one call: kind "ok", "tool_error" or "error"."""
    try:
        out = env.call(state, name, arguments)
        return "ok", truncate(_as_text(out), limit), state
    except ToolError as exc:
        return "tool_error", truncate(str(exc), limit), state
    except Exception as exc:
        return "error", truncate(f"the tool raised {type(exc).__name__}: {exc}", limit), state


def _child(conn: Any, fn: Any, args: tuple) -> None:
    os.setpgrp()  # own process group: the parent kills everything this call starts
    try:
        result = fn(*args)
    except BaseException as exc:
        result = ("error", f"{type(exc).__name__}: {exc}", None)
    try:
        conn.send(result)
    finally:
        conn.close()


def run_isolated(fn: Any, args: tuple, timeout_s: float) -> tuple[Any, bool]:
    """``(fn(*args), timed_out)`` computed in a forked child killed (with its process group) at
    ``timeout_s``; a child that dies or times out gives ``(None, timed_out)``."""
    ctx = multiprocessing.get_context("fork")
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(writer, fn, args), daemon=True)
    proc.start()
    writer.close()
    result, timed_out = None, False
    try:
        if reader.poll(timeout_s):
            try:
                result = reader.recv()
            except (EOFError, OSError):
                result = None
        else:
            timed_out = True
    finally:
        reader.close()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join()
    return result, timed_out


def run_tool_call(
    env: Any, state: Any, call: ToolCall, tool_names: set[str], limits: ToolLimits
) -> ToolOutcome:
    """Run ``call`` against ``env``; every failure becomes a tool result starting ``error:``, never raises."""
    start = time.perf_counter()

    def failed(message: str, timed_out: bool = False) -> ToolOutcome:
        text = truncate(f"error: {message}", limits.max_output_chars)
        return ToolOutcome(text, True, time.perf_counter() - start, state, timed_out)

    if call.error:
        return failed(call.error)
    if call.name not in tool_names:
        return failed(f"unknown tool {call.name!r}; the tools are {sorted(tool_names)}")
    limit = limits.max_output_chars
    if getattr(env, "isolation", "process") == "inline":
        kind, payload, new_state = _invoke(env, state, call.name, call.arguments, limit)
    else:
        result, timed_out = run_isolated(
            _invoke, (env, state, call.name, call.arguments, limit), limits.call_timeout_s
        )
        if timed_out:
            return failed(f"tool {call.name!r} did not finish within {limits.call_timeout_s:g} s", True)
        if result is None:
            return failed(f"tool {call.name!r} crashed")
        kind, payload, new_state = result
    if kind != "ok":
        return failed(str(payload))
    return ToolOutcome(str(payload), False, time.perf_counter() - start, new_state)


def _score(env: Any, state: Any, row: Any, answer: str) -> tuple[str, Any, Any]:
    try:
        return "ok", env.score(state, row, answer), None
    except Exception as exc:
        return "error", f"{type(exc).__name__}: {exc}", None


def score_episode(env: Any, state: Any, row: Any, answer: str | None, limits: ToolLimits) -> EpisodeScore:
    """The episode's score; 0 without a final answer, and 0 (with the reason) when scoring fails."""
    if answer is None:
        return EpisodeScore(0.0, False, {"reason": "no final answer"})
    if getattr(env, "isolation", "process") == "inline":
        kind, value, _ = _score(env, state, row, answer)
    else:
        result, timed_out = run_isolated(_score, (env, state, row, answer), limits.call_timeout_s)
        if result is None:
            reason = "scoring timed out" if timed_out else "scoring crashed"
            return EpisodeScore(0.0, False, {"reason": reason})
        kind, value, _ = result
    if kind != "ok":
        return EpisodeScore(0.0, False, {"reason": f"scoring failed: {value}"})
    if isinstance(value, EpisodeScore):
        return value
    try:
        reward = float(value)
    except (TypeError, ValueError):
        return EpisodeScore(0.0, False, {"reason": f"score returned {type(value).__name__}, not a number"})
    if not math.isfinite(reward) or not 0.0 <= reward <= 1.0:
        return EpisodeScore(0.0, False, {"reason": f"score {value!r} is outside [0, 1]"})
    return EpisodeScore(reward)
