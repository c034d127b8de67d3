"""User-facing errors: one line that names the problem and the fix; the CLI prints them without a traceback."""


class KTError(ValueError):
    """Bad input or state that the user can fix; the message says how."""

    shown = False   # True: already printed (the CLI prints it once)


class ShownKTError(KTError):
    """A KTError printed where it happened, before a slow clean-up (e.g. MLflow retrying a dead server)."""

    shown = True


def first_line(error: BaseException, limit: int = 160) -> str:
    """The first non-empty line of an exception's message (or its type), cut to ``limit`` characters.

    Example:
        >>> first_line(RuntimeError("no server\\nTraceback ..."))
        'no server'
    """
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return text[:limit]
