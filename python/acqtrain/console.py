"""What the command line prints while it works: progress bars only on a terminal, plain lines always."""
from __future__ import annotations

import sys


def bars_enabled(progress: bool) -> bool:
    """tqdm bars redraw with carriage returns: only when asked for and stderr (their stream) is a terminal."""
    stream = sys.stderr
    return bool(progress) and hasattr(stream, "isatty") and stream.isatty()


def say(line: str) -> None:
    """One line on stdout that does not tear a progress bar that is being drawn."""
    from tqdm import tqdm
    tqdm.write(line, file=sys.stdout)


def warn(message: str) -> None:
    print(f"acq: warning: {message}", file=sys.stderr)
