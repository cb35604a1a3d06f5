"""The exceptions for bad input.

Library code raises :class:`SettingError` (a ``ValueError``) about one of its own arguments or
settings, named as Python names it (``sigma_min: expected a value in [0, 1), got 2.0``), and
:class:`UserError` (a ``ValueError`` too) about a file, naming the file. Only the command line
speaks of options: it prints a setting's error under the option's name (``--sigma-min: ...``) as
one line on stderr, and exits with status 2.
"""


class UserError(ValueError):
    """Bad input from the user: a file, an argument or a value that cannot be used."""


class SettingError(UserError):
    """A bad value of the argument or setting ``setting``; ``detail`` says what was expected."""

    def __init__(self, setting: str, detail: str):
        self.setting, self.detail = setting, detail
        super().__init__(f"{setting}: {detail}")

    def __reduce__(self):  # picklable with both arguments (DataLoader workers pass errors back)
        return type(self), (self.setting, self.detail)


def first_sentence(e: Exception) -> str:
    """The first sentence of an exception's message (torch's run on for several lines), for a
    one-line error about the user's file."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text.split(". ")[0][:200]
