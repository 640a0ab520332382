"""The one exception type pyguard raises for bad input (files, conversations, options)."""


class PyguardError(Exception):
    """A problem with the user's input, described in one line; the CLI prints it without a traceback."""
