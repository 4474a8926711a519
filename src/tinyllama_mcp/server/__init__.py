"""tinyllama-mcp's MCP layer: tools, transports, auth, the durable job queue and its worker.

Nothing here imports torch or transformers at import time: a host starting the server over stdio
must get `initialize` and `tools/list` answered quickly. Training runs in job subprocesses
(`python -m tinyllama_mcp.pipeline run JOB_DIR`); generation imports the model stack lazily in a worker thread.
"""

__version__ = "0.1.0"
SERVER_NAME = "tinyllama-mcp"
