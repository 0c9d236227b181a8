"""The one exception type users see.

Everything a user can get wrong (a recipe, a data file, a plugin reference) raises ``KexaoneError``
with a message that names the problem; the CLI prints it without a traceback and exits with status 2.
"""


class KexaoneError(Exception):
    """A user-facing error: bad recipe, bad input file, missing optional dependency, ..."""

    exit_code: int = 2


class MissingExtraError(KexaoneError):
    """An optional dependency (for example the ``vllm`` extra) is needed but not installed."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the '{package}' package, which is not installed. "
            f"Install it with: pip install 'kexaone-align[{extra}]'"
        )
