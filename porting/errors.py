"""The one error type every bad-weights case raises, the one place other libraries' errors become it, stops, and
every command's exit codes."""

from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import Iterator
from typing import Any


class PortingError(ValueError):
    """Weights that cannot be ported: a bad file, missing or unexpected keys, a wrong shape or dtype, NaN/Inf."""


# A value quoted from a file in an error message is cut to this many characters (a 15,000-character name or a
# megabyte-long list must not become the message).
MAX_SHOWN_CHARS = 80
# The signals that stop a command cleanly: it exits with 128 + the signal's number, as a shell reports a kill.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Every command's exit codes, one meaning each (docs/reliability.md lists them).
EXIT_OK = 0
EXIT_ERROR = 1  # an unexpected exception (a bug, an OSError nobody anticipated): its traceback is printed
EXIT_BAD_INPUT = 2  # a refusal: one message naming the input and the fix, nothing changed
EXIT_NONFINITE = 3  # training stopped by non-finite steps (a checkpoint was saved first)
EXIT_CHECKPOINT = 4  # a checkpoint that failed to save or could not be restored
EXIT_PEER_FAILED = 5  # multi-process training: another process failed (its message is printed)
SIGNAL_EXIT_BASE = 128  # stopped by a signal: 128 + its number (143 SIGTERM, 130 SIGINT)


class LayoutMismatch(PortingError):
    """Keys or shapes that are not an architecture's: the weights are another network's (not bad values)."""


class Stopped(BaseException):
    """A SIGTERM/SIGINT raised as an exception (by the CLI's handler) so that every cleanup runs before exit."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# The signal a handler turned into Stopped. Python drops an exception raised inside a GC callback or __del__
# ("Exception ignored in ..."), so writers call raise_if_stopped() before they commit anything.
pending_stop: list[int] = []


def raise_if_stopped() -> None:
    """Raise Stopped again if a stop signal arrived and its exception was swallowed."""
    if pending_stop:
        raise Stopped(pending_stop[0])


@contextlib.contextmanager
def failing_as(prefix: str, suffix: str = "", error: type[PortingError] = PortingError) -> Iterator[None]:
    """Turn whatever a third-party reader or writer raises into ONE `error` (a PortingError): prefix, the cause,
    suffix."""
    try:
        yield
    except PortingError:
        raise
    except Exception as exc:  # torch, safetensors, msgpack, orbax and tensorstore each raise unrelated types
        if isinstance(exc, OSError) and exc.strerror:
            cause = f"[Errno {exc.errno}] {exc.strerror}"  # without the temporary's name that str(exc) carries
        else:
            cause = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
        raise error(f"{prefix}: {cause}{suffix}") from exc


def parse_json(text: str | bytes, where: str) -> Any:
    """JSON from a file (config.json, a .meta.json, a serving sidecar), or ONE PortingError naming `where`: invalid
    text, and nesting too deep for Python's parser (RecursionError, not a ValueError), alike."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        cause = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise PortingError(f"{where}: not valid JSON ({cause})") from None


def shown(value: Any) -> str:
    """A value from a file, as an error message quotes it: its repr, cut to MAX_SHOWN_CHARS."""
    text = repr(value)
    return text if len(text) <= MAX_SHOWN_CHARS else text[:MAX_SHOWN_CHARS] + "..."
