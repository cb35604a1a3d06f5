"""The exceptions for bad input.

Library code raises :class:`SettingError` (a ``ValueError``) about one of its own arguments or
settings, named as Python names it (``sigma_min: expected a value in [0, 1), got 2.0``), and
:class:`UserError` (a ``ValueError`` too) about a file, naming the file. Only the command line
speaks of options: it prints a setting's error under the option's name (``--sigma-min: ...``) as
one line on stderr, and exits with status 2.

Two more ways a command ends without its result: :class:`EnvironmentFault` (a ``UserError`` too,
naming the path) is a fault of the machine rather than of the input — a full disk, a read-only
folder — and exits with status 1; :class:`Stopped` is a stop asked for by SIGTERM (a scheduler's
preemption), honoured at a safe point (:func:`sigterm_stops`), and exits with status 143.
"""

import contextlib
import signal
import threading


class UserError(ValueError):
    """Bad input from the user: a file, an argument or a value that cannot be used."""


class SettingError(UserError):
    """A bad value of the argument or setting ``setting``; ``detail`` says what was expected."""

    def __init__(self, setting: str, detail: str):
        self.setting, self.detail = setting, detail
        super().__init__(f"{setting}: {detail}")

    def __reduce__(self):  # picklable with both arguments (DataLoader workers pass errors back)
        return type(self), (self.setting, self.detail)


class EnvironmentFault(UserError):
    """A fault of the environment, not of the input, at ``path``: a full disk, a quota, a read-only
    or failing file system. The command line prints it as one line and exits with status 1."""

    exit_code = 1


class Stopped(Exception):
    """A command stopped at a safe point because SIGTERM asked it to (a scheduler preempting the job):
    the message says what was kept and how to continue. The command line prints it as one line
    and exits with status 143 (128 + SIGTERM, what a process killed by SIGTERM reports)."""

    exit_code = 143


#: the SIGTERM request of the outermost :func:`sigterm_stops` in force (nested ones share it)
_stop = {"depth": 0, "requested": False}


def _request_stop(signum, frame) -> None:
    _stop["requested"] = True


@contextlib.contextmanager
def sigterm_stops():
    """While inside, SIGTERM asks the command to stop (:func:`stop_requested` turns true) instead of
    killing the process; the previous handler is restored on leaving. Nested uses share one request,
    so a SIGTERM between two stages (reflow's pairs, then its training) is honoured by the next
    check. Outside the main thread (where Python cannot set a handler) it does nothing."""
    outer = _stop["depth"] == 0
    previous = None
    if outer:
        _stop["requested"] = False
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _request_stop)
    _stop["depth"] += 1
    try:
        yield
    finally:
        _stop["depth"] -= 1
        if outer:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            _stop["requested"] = False


def stop_requested() -> bool:
    """Whether SIGTERM has asked the command to stop (inside :func:`sigterm_stops`)."""
    return _stop["requested"]


def first_sentence(e: Exception) -> str:
    """The first sentence of an exception's message (torch's run on for several lines), for a
    one-line error about the user's file."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text.split(". ")[0][:200]
