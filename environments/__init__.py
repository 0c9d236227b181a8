"""Tool environments as plugins (imported as ``kexaone_align.environments``).

An environment gets a prompt row, exposes tools (JSON schemas as the chat template takes them),
executes the policy's tool calls within ``ToolLimits`` and scores the episode. Built-ins: ``python``
(code in the sandbox), ``calculator`` and ``orders`` (a stateful data-file environment,
``environments/data/orders.json``). Plugins register with ``@register_environment``, through the
entry-point group ``kexaone_align.environments``, or are named as ``module:attr``,
``path/file.py:attr`` or ``path/env.json`` in a row's ``environment``. ``generate.py`` writes new
data-file environments with an LLM and keeps the ones that pass its checks (``kexaone-align envgen``).
"""

from pathlib import Path

from kexaone_align.environments.api import (
    Environment,
    EpisodeScore,
    ToolCall,
    ToolError,
    ToolLimits,
    get_environment,
    register_environment,
    registered_environments,
)
from kexaone_align.environments.loading import ENTRY_POINT_GROUP, resolve_environment
from kexaone_align.environments.python_tool import (
    CalculatorEnvironment,
    PythonToolEnvironment,
    function_schema,
    tool_name,
)
from kexaone_align.environments.session import (
    ToolOutcome,
    final_answer,
    parse_tool_calls,
    run_tool_call,
    score_episode,
)
from kexaone_align.environments.stateful import DataEnvironment, rows_from_environment

DATA_DIR = Path(__file__).parent / "data"


@register_environment("orders")
def _orders() -> DataEnvironment:
    return DataEnvironment.from_file(DATA_DIR / "orders.json")


__all__ = [
    "DATA_DIR",
    "ENTRY_POINT_GROUP",
    "CalculatorEnvironment",
    "DataEnvironment",
    "Environment",
    "EpisodeScore",
    "PythonToolEnvironment",
    "ToolCall",
    "ToolError",
    "ToolLimits",
    "ToolOutcome",
    "final_answer",
    "function_schema",
    "get_environment",
    "parse_tool_calls",
    "register_environment",
    "registered_environments",
    "resolve_environment",
    "rows_from_environment",
    "run_tool_call",
    "score_episode",
    "tool_name",
]
