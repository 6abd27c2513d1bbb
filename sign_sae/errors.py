"""The project's error type: a mistake the user can fix, said in one line."""


class SignSAEError(ValueError):
    """Bad input, config or file, with a message that names the problem and the fix. The CLI
    prints it as one line and exits 2; anything else is a bug and keeps its traceback. It is a
    ``ValueError``, so ``except ValueError`` still catches it."""


def unreachable(what: str, error: BaseException) -> SignSAEError | None:
    """The one-line error for ``what`` (a dataset, model or release named as the user wrote it)
    when ``error`` says it is neither in the local cache nor reachable on the hub; None when
    ``error`` is something else (a local file that is missing stays a FileNotFoundError)."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    local = isinstance(error, FileNotFoundError) and not isinstance(error, LocalEntryNotFoundError)
    if not isinstance(error, OSError) or local:
        return None
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return SignSAEError(
        f"{what} is not in the local cache and the hub cannot be reached ({reason}). Fetch it "
        "once with network access, or use the offline defaults (model smollm2-135m, text "
        "shakespeare)."
    )


class DivergedError(SignSAEError):
    """Training stopped because the loss became NaN or infinite at ``step``."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step
