"""The library's user-facing errors: each message says what is wrong and what to do."""


class UserError(Exception):
    """Bad input or a missing prerequisite; the CLI prints the message, never a traceback."""
