"""Training and inference for tinyllama-mcp: QLoRA SFT -> DPO -> merge -> generate.

Knows nothing of MCP. The server drives it through `pipeline.specs` and
`python -m tinyllama_mcp.pipeline run JOB_DIR` (see docs/PIPELINE_CLI.md).
"""

__version__ = "0.1.0"
