"""The one exception type for bad user input.

Library code raises :class:`UserError` (a ``ValueError``) with a message that names the
file or option and says what was expected; the command line prints it as one line on
stderr and exits with status 2.
"""


class UserError(ValueError):
    """Bad input from the user: a file, an option or a value that cannot be used."""
