"""The one error type for mistakes a caller can fix, shared by the server and the pipeline."""


class UserError(Exception):
    """A request that cannot be served as asked (a wrong spec, data or model reference): the message says what was
    wrong and what to do, and retrying will not help. Tools return it as an MCP tool error (`isError: true`) with the
    message verbatim; a job ends with it as its `error` event and exit status 2."""


class SelfCheckError(UserError):
    """The run checked its own result and found it wrong: reported as a failure, never as success; retrying the
    same job would give the same result."""
