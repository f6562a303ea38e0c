"""The one error type the CLI turns into a single message and a non-zero exit code."""


class AcqError(Exception):
    """Bad user input or an unusable file: reported as one line, no traceback."""
