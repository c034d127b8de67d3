"""User-facing errors: one line that names the problem and the fix; the CLI prints them without a traceback."""


class KTError(ValueError):
    """Bad input or state that the user can fix; the message says how."""
