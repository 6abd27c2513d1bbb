"""The project's error type: a mistake the user can fix, said in one line."""


class SignSAEError(ValueError):
    """Bad input, config or file, with a message that names the problem and the fix. The CLI
    prints it as one line and exits 2; anything else is a bug and keeps its traceback. It is a
    ``ValueError``, so ``except ValueError`` still catches it."""
