"""The one exception type a user sees: a one-line message naming the file, key, column or row."""


class RatchetError(Exception):
    """Bad input or configuration. The CLI prints `error: <message>` and exits with status 2."""
