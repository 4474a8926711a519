"""The engine's knobs in one frozen record, and the one function that fills in their defaults.

`EngineConfig` is what a caller asks for; a None field means "the default for this device and model".
`resolve_config` turns it into the config the engine runs with: every field concrete except `attention`
(None there means "chosen per batch size"). It is the only place that reads the environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Optional, Sequence

ENV_COMPILE = "TINYLLAMA_MCP_ENGINE_COMPILE"  # layer | helpers | none (1 = layer, 0 = none); CUDA only
ENV_ATTENTION = "TINYLLAMA_MCP_ENGINE_ATTENTION"  # reduce | sdpa at every batch size
ENV_GEMV = "TINYLLAMA_MCP_ENGINE_GEMV"  # 0: never the Triton GEMV variant at batch 1

COMPILE_MODES = ("layer", "helpers", "none")
ATTENTIONS = ("reduce", "sdpa")


@dataclass(frozen=True)
class EngineConfig:
    max_batch: Optional[int] = None  # requests decoding together (KV-cache rows); None: 32 on CUDA, 8 on CPU
    max_len: Optional[int] = None  # prompt + new tokens of one request; None: the model's context, at most 4096
    max_queue: int = 256  # requests waiting for a row before submit raises EngineFull
    chunk: Optional[int] = None  # decode steps launched per read-back of their tokens; None: 8 on CUDA, 4 on CPU
    cuda_graphs: Optional[bool] = None  # replay decode and batch-1 prefill from CUDA graphs; None: on CUDA
    # layer: each decode layer compiled whole; helpers: only RMSNorm/RoPE/SiLU*mul; none: eager.
    # None: TINYLLAMA_MCP_ENGINE_COMPILE (default layer) on CUDA, none on CPU.
    compile_mode: Optional[str] = None
    # Decode attention at every batch size (reduce | sdpa); None: TINYLLAMA_MCP_ENGINE_ATTENTION, else
    # reduce at batch 1 and sdpa above where the layer is compiled, sdpa elsewhere.
    attention: Optional[str] = None
    # Try batch-1 projections as Triton reductions (kept if their graph times faster); None: where CUDA graphs
    # run, unless TINYLLAMA_MCP_ENGINE_GEMV=0. True compiles them even without graphs (nothing then picks them).
    batch1_gemv: Optional[bool] = None
    eos_token_ids: Optional[Sequence[int]] = None  # None: the tokenizer's and the model's generation config's
    prefill_tokens: int = 8192  # right-padded prompt tokens one prefill may take (never fewer than max_len)
    stream_interval_s: float = 0.25  # the least time between two on_text calls of a request
    idle_exit_s: float = 30.0  # the engine thread exits after this long without work (a submit restarts it)

    def __post_init__(self) -> None:
        if self.compile_mode is not None and self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be layer, helpers or none, not {self.compile_mode!r}")
        if self.attention is not None and self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be reduce or sdpa, not {self.attention!r}")
        if self.eos_token_ids is not None:
            object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))


def resolve_config(config: EngineConfig, *, on_cuda: bool, model_context: int,
                   model_eos_ids: Sequence[int]) -> EngineConfig:
    """`config` with its defaults filled in for this device and model, the environment variables read here."""
    max_len = int(config.max_len or min(model_context, 4096))
    cuda_graphs = on_cuda if config.cuda_graphs is None else (config.cuda_graphs and on_cuda)
    compile_mode = config.compile_mode
    if compile_mode is None:
        env = os.environ.get(ENV_COMPILE, "layer").strip().lower()
        compile_mode = {"1": "layer", "0": "none", "": "layer", "false": "none"}.get(env, env) if on_cuda else "none"
    batch1_gemv = config.batch1_gemv
    if batch1_gemv is None:
        batch1_gemv = os.environ.get(ENV_GEMV, "1") != "0" and cuda_graphs
    return replace(
        config,
        max_batch=int(config.max_batch or (32 if on_cuda else 8)),
        max_len=max_len,
        chunk=int(config.chunk or (8 if on_cuda else 4)),
        cuda_graphs=cuda_graphs,
        compile_mode=compile_mode,  # validated by __post_init__, the environment's value too
        attention=config.attention or os.environ.get(ENV_ATTENTION) or None,
        batch1_gemv=batch1_gemv,
        eos_token_ids=model_eos_ids if config.eos_token_ids is None else config.eos_token_ids,
        prefill_tokens=max(config.prefill_tokens, max_len),
    )
