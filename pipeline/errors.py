"""Errors a user can act on: the message says what was wrong and what to do."""


class UserError(Exception):
    """The spec, the data or the model reference is wrong; retrying will not help (exit status 2)."""
