"""The ``code`` verifier: run the model's last fenced Python block against tests in a hardened sandbox.

Modules: ``extract`` (find the program), ``sandbox`` (namespaces + rlimits jail, ``run_sandboxed``),
``nsinit`` (the supervisor inside the jail), ``harness`` (call-based runner inside the jail),
``checker`` / ``runner`` (assert-style tests and the program, two interpreters inside the jail),
``asserts`` (their parent side), ``codec`` (typed JSON for values crossing processes), ``compare``
(output/value comparison in the verifier process), ``verifier`` (``CodeVerifier``) and ``convert``
(HumanEval / MBPP rows to task rows).
Importing this package registers ``CodeVerifier`` under the name ``code``.
"""

from kexaone_align.verifiers.api import register_verifier
from kexaone_align.verifiers.code.extract import extract_program
from kexaone_align.verifiers.code.sandbox import (
    SandboxLimits,
    SandboxResult,
    detect_isolation_mode,
    run_sandboxed,
)
from kexaone_align.verifiers.code.verifier import CodeVerifier, parse_reference

register_verifier("code")(CodeVerifier)

__all__ = [
    "CodeVerifier",
    "SandboxLimits",
    "SandboxResult",
    "detect_isolation_mode",
    "extract_program",
    "parse_reference",
    "run_sandboxed",
]
