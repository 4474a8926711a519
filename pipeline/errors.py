"""Errors a user can act on: the message says what was wrong and what to do."""


class UserError(Exception):
    """The spec, the data or the model reference is wrong; retrying will not help (exit status 2)."""


class SelfCheckError(UserError):
    """The run checked its own result and found it wrong: reported as a failure, never as success; retrying the
    same job would give the same result (exit status 2)."""
