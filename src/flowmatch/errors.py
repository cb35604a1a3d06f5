"""The one exception type for bad user input.

Library code raises :class:`UserError` (a ``ValueError``) with a message that names the
file or option and says what was expected; the command line prints it as one line on
stderr and exits with status 2.
"""


class UserError(ValueError):
    """Bad input from the user: a file, an option or a value that cannot be used."""


def first_sentence(e: Exception) -> str:
    """The first sentence of an exception's message (torch's run on for several lines), for a
    one-line error about the user's file."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text.split(". ")[0][:200]
