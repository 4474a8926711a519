"""The OpenAI-compatible endpoint: /v1/* on the HTTP transport, beside /mcp, from the same process.

It shares the bearer token, the Host/Origin checks and the body limit with MCP (server.transports), and the
generator cache with MCP generate, so requests to one model batch together in one engine. Modules: schemas (the
request bodies), errors (OpenAI's error shape), listing (/v1/models from the job store), runs (choices on the
generator cache), streaming (server-sent events), logprobs, chat, completions, tokens, routes (the app).
"""

from tinyllama_mcp.server.openai_api.routes import build_v1_app

__all__ = ["build_v1_app"]
