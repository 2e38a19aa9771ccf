"""The one error type a user can cause; the CLI prints it as a single line."""


class GenddError(Exception):
    """A problem with the user's input (spec, path, cache, options); the message says what to do."""
