"""Fast generation for Llama-architecture models: static KV cache, CUDA-graph decode, continuous batching.

It serves any plain `LlamaForCausalLM` (merged checkpoints, tiny-demo, the TinyLlama base) and a PEFT stack
whose last LoRA adapter is still live, without running the Hugging Face modules: it reads their weights once
and runs its own small Llama forward. One background thread owns the GPU work.

    config.py     EngineConfig, every knob, and resolve_config (the one reader of the environment)
    info.py       EngineInfo: the modes that run and every fallback, with its reason
    weights.py    the private, fused copy of the weights (a live LoRA merged in)
    layers.py     the decode layer and head as plain functions
    sampling.py   SamplingParams and the seeded, stateless sampler
    kernels.py    which layer/head functions run: the compile fallback chain
    graphs.py     CUDA graph capture and replay
    runner.py     the KV cache and the prefill and decode steps over it
    requests.py   a request's state, its handle, the queue-full and closed refusals
    exact_steps.py  step-by-step decoding with the host in the loop: grammar masks, logprobs, prompt scoring
    scheduler.py  Engine: requests, queue, slots, continuous batching, streaming, cancel
"""

from tinyllama_mcp.pipeline.engine.config import EngineConfig
from tinyllama_mcp.pipeline.engine.info import Batch1Gemv, EngineInfo, Fallback
from tinyllama_mcp.pipeline.engine.sampling import SamplingParams
from tinyllama_mcp.pipeline.engine.scheduler import Engine, EngineClosed, EngineFull, RequestHandle, TextCallback
from tinyllama_mcp.pipeline.engine.weights import EngineUnsupported
from tinyllama_mcp.pipeline.generation_result import GenerationResult

__all__ = [
    "Batch1Gemv", "Engine", "EngineClosed", "EngineConfig", "EngineFull", "EngineInfo", "EngineUnsupported",
    "Fallback", "GenerationResult", "RequestHandle", "SamplingParams", "TextCallback",
]
