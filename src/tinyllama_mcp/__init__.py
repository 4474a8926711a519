"""tinyllama-mcp: an MCP server through which AI agents retrain (QLoRA SFT -> DPO -> merge) and query a small LLM.

Two packages: `tinyllama_mcp.server` (MCP tools, transports, the job queue and worker; no torch at import time) and
`tinyllama_mcp.pipeline` (training and inference, knows nothing of MCP; `python -m tinyllama_mcp.pipeline run JOB_DIR`).
"""

__version__ = "0.1.0"
