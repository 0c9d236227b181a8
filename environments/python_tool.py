"""Built-in tools that run code: ``python`` (model-written code in the code verifier's sandbox) and
``calculator`` (arithmetic expressions, evaluated by a small bounded AST walker, no ``eval``).

Both are graded by the verifier of the row's task (e.g. ``math`` against the row's reference).
"""

from __future__ import annotations

import ast
import operator
from typing import Any

from kexaone_align.environments.api import Environment, ToolError, register_environment


def function_schema(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict:
    """A tool schema in the form the chat template lists (OpenAI-style ``function`` object)."""
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


def tool_name(schema: dict[str, Any]) -> str:
    """The name of a tool schema (``{"function": {"name"}}`` or a bare ``{"name"}``)."""
    fn = schema.get("function", schema) if isinstance(schema, dict) else {}
    return str(fn.get("name", "")) if isinstance(fn, dict) else ""


@register_environment("python")
class PythonToolEnvironment(Environment):
    """One tool, ``python(code)``: runs the code in the sandbox and returns stdout (and stderr)."""

    name = "python"
    isolation = "inline"  # the sandbox is the isolation: it kills the run at its own wall clock

    def __init__(
        self, timeout_s: float = 5.0, memory_mb: int = 512, max_output_bytes: int = 64 << 10
    ) -> None:
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.max_output_bytes = max_output_bytes

    def tools(self, row: Any) -> list[dict[str, Any]]:
        schema = function_schema(
            "python",
            "Run a Python program and return what it prints.",
            {"code": {"type": "string", "description": "the program"}},
            ["code"],
        )
        return [schema]

    def call(self, state: Any, name: str, arguments: dict[str, Any]) -> str:
        from kexaone_align.verifiers.code.sandbox import SandboxLimits, run_sandboxed

        code = arguments.get("code")
        if name != "python":
            raise ToolError(f"unknown tool {name!r}")
        if not isinstance(code, str):
            raise ToolError("python needs a string argument 'code'")
        limits = SandboxLimits(
            cpu_s=self.timeout_s, wall_s=self.timeout_s, memory_mb=self.memory_mb,
            max_output_bytes=self.max_output_bytes,
        )  # fmt: skip
        result = run_sandboxed(code, limits=limits)
        out = result.stdout.decode("utf-8", "replace")
        err = result.stderr.decode("utf-8", "replace")
        if result.setup_error:
            raise ToolError(f"the sandbox could not start: {result.setup_error}")
        if result.timed_out or result.killed_reason == "cpu_time":  # whichever limit a busy loop hits first
            raise ToolError(f"the program did not finish within {self.timeout_s:g} s")
        notes = []
        if result.stdout_truncated or (result.killed_reason and "output" in result.killed_reason):
            notes.append(f"[output cut at {self.max_output_bytes} bytes]")
        elif result.killed_reason:
            notes.append(f"[killed: {result.killed_reason}]")
        if result.exit_code not in (0, None):
            notes.append(f"[exit code {result.exit_code}]")
        text = out + (("\n" + err.strip()) if err.strip() and result.exit_code != 0 else "")
        return "\n".join([text.rstrip("\n"), *notes]).strip("\n")


_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_MAX_DIGITS = 60


def evaluate_arithmetic(expression: str) -> int | float:
    """Value of an arithmetic expression over numbers, + - * / // % ** and parentheses (bounded size)."""
    if len(expression) > 200:
        raise ToolError("expression is longer than 200 characters")
    try:
        tree = ast.parse(expression.replace("^", "**").replace("×", "*"), mode="eval")
    except SyntaxError:
        raise ToolError(f"cannot parse {expression!r} as arithmetic") from None

    def walk(node: ast.AST) -> int | float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            value = walk(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 10**6):
                raise ToolError("exponent too large")
            try:
                value = _BINOPS[type(node.op)](left, right)
            except ZeroDivisionError:
                raise ToolError("division by zero") from None
            if isinstance(value, int) and len(str(abs(value))) > _MAX_DIGITS:
                raise ToolError("result too large")
            return value
        raise ToolError(f"unsupported element in {expression!r}: only numbers and + - * / // % ** ( )")

    value = walk(tree)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return int(value)
    return value


@register_environment("calculator")
class CalculatorEnvironment(Environment):
    """One tool, ``calculator(expression)``: exact integer arithmetic for the tiny tool task."""

    name = "calculator"
    isolation = "inline"  # bounded: expression length, exponent and result size are capped

    def tools(self, row: Any) -> list[dict[str, Any]]:
        schema = function_schema(
            "calculator",
            "Evaluate an arithmetic expression.",
            {"expression": {"type": "string", "description": "the expression"}},
            ["expression"],
        )
        return [schema]

    def call(self, state: Any, name: str, arguments: dict[str, Any]) -> str:
        expression = arguments.get("expression")
        if not isinstance(expression, str | int | float) or isinstance(expression, bool):
            raise ToolError("calculator needs a string argument 'expression'")
        return str(evaluate_arithmetic(str(expression)))
