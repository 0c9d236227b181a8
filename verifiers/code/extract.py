"""Find the program in a model response: the last fenced Python block after the final ``</think>``.

Reasoning models often sketch code while thinking; only what follows the last ``</think>`` is the
answer. Among the fenced blocks there, the last ```python / ```py / ```python3 or bare ``` block wins
(blocks tagged with another language, e.g. ```text or ```bash, are skipped). An unterminated final
fence (generation cut off) is not accepted: truncated code is not an answer.
"""

from __future__ import annotations

import re

_FENCE = re.compile(
    r"^[ \t]*```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.DOTALL | re.MULTILINE
)
_PY_TAGS = {"", "python", "py", "python3", "py3"}


def extract_program(response: str) -> str | None:
    """The last fenced Python block of the answer part of ``response``, or None when there is none."""
    if not isinstance(response, str):
        return None
    answer = response.rsplit("</think>", 1)[-1]
    blocks = [m.group(2) for m in _FENCE.finditer(answer) if m.group(1).lower() in _PY_TAGS]
    if not blocks:
        return None
    code = blocks[-1]
    return code if code.strip() else None
