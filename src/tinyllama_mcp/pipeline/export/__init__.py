"""Export: one servable model written in formats other tools load (GGUF for llama.cpp and Ollama, a GGUF LoRA, an
Ollama Modelfile, a PEFT adapter for vLLM, a merged safetensors checkpoint), each read back and verified against
the source model before the job succeeds (verify.py says how). run.run_export is the stage; verify.verify_export
checks a finished export again."""
