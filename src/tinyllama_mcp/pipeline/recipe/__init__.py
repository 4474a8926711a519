"""The QLoRA SFT -> DPO -> merge recipe of docs/ai/FINE_TUNING_TINYLLAMA.md, one stage a module, each readable top to
bottom; the speed-ups are named calls into tinyllama_mcp.pipeline.speed."""
