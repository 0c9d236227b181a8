"""Verifier plugins: ``Sample`` in, ``VerifyResult`` out. Imported as ``kexaone_align.verifiers``."""

from kexaone_align.verifiers.api import (
    FunctionVerifier,
    Sample,
    Verifier,
    VerifyResult,
    get_verifier,
    register_verifier,
    registered_names,
)

__all__ = [
    "FunctionVerifier",
    "Sample",
    "Verifier",
    "VerifyResult",
    "get_verifier",
    "register_verifier",
    "registered_names",
]
