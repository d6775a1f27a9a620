"""The exception types a user sees: a one-line message naming the file, key, column or row."""


class RatchetError(Exception):
    """Bad input or configuration. The CLI prints `error: <message>` and exits with status 2.
    Deterministic: the same input fails the same way, so the flow does not retry it."""


class StageFailed(RatchetError):
    """A failure a retry may fix (a training process died: killed, out of memory). The CLI
    prints `failed: <message>` and exits with status 1; the flow retries it."""
