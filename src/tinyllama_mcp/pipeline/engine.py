"""Fast generation for Llama-architecture models: static KV cache, CUDA-graph decode, continuous batching.

What it serves: any `LlamaForCausalLM` (merged checkpoints, tiny-demo, the TinyLlama base) and a
PEFT stack whose last LoRA adapter is still live. The engine does not run the Hugging Face modules:
it reads their weights once and runs its own small Llama forward (RMSNorm, RoPE, grouped-query
attention over the cache through SDPA, SwiGLU MLP), with Q|K|V and gate|up fused into one GEMM each.

Unmerged LoRA: the adapter is merged into the engine's *private* copy of the weights (W + s*B@A,
computed in fp32), so serving costs no extra kernels; the Hugging Face model, with its live
adapter, is left untouched. DoRA and LoRA biases are not supported (the caller falls back to HF).

Layout and flow (one background thread owns the GPU work):

- KV cache: two tensors [layers, slots, kv_heads, max_len, head_dim], allocated once. A request
  holds one slot (row) from prefill to finish; finished rows are refilled by waiting requests
  between decode chunks, and the highest busy row is moved into holes, so the running batch stays
  dense (continuous batching).
- Prefill: the new requests, right-padded to one length, in one forward (causal SDPA); it writes
  their K/V rows and samples their first token on the GPU. A lone request (the common case for an
  agent) replays a CUDA graph of its prompt-length bucket (16, 32, 64, ...): eager, the prefill's
  ~20 launches a layer took longer than the GPU work.
- Decode: one step = embed -> 22 layers -> logits -> sampling -> next input, all on the GPU, with
  the state (input token, position) kept in static buffers the step itself advances. On CUDA each
  (batch size, context bucket, greedy|sampling) is captured once in a CUDA graph and replayed; the
  running batch is padded up to the next captured size (1, 2, 4, 8, then steps of 8); attention reads
  only the first `bucket` positions of the cache (256, 512, 1024, ...).
- Kernels per step (compile_mode, a fallback chain recorded in `info`): "layer" compiles each decode
  layer whole with inductor (fullgraph; residual add fused into the next RMSNorm, RoPE with the K/V
  write, SiLU*mul; attention as fp32 multiply-and-sum reductions at batch 1, SDPA above) and the head,
  and captures those in the graphs above; at batch 1 a second variant with the projections as Triton
  reductions (GEMV) is timed against cuBLAS and the faster kept (`info["batch1_gemv"]`). If compiling or
  capturing fails: "helpers" (compiled RMSNorm/RoPE/SiLU*mul, SDPA attention), then "none" (eager).
- The host never waits per token: `chunk` steps are launched back to back, their tokens copied to
  pinned memory once, and read while the next chunk already runs. A request that hit EOS or a stop
  string keeps its row for at most two more chunks; the extra tokens are dropped.
- Sampling: temperature, top-p, and a per-request seed, without any RNG state: the noise for token
  v at position p of a request seeded s is a hash of (s, p, v) (Gumbel-max / exponential race), so a
  seeded request gives the same text whatever else is in the batch, and graphs need no RNG handling.
- On CPU (tests) exactly the same code runs eagerly, without graphs.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from tinyllama_mcp.pipeline.nn import ops as llama_ops
from tinyllama_mcp.errors import UserError

log = logging.getLogger(__name__)

TextCallback = Callable[[str, int], None]


class EngineUnsupported(Exception):
    """The model cannot be served by the engine (architecture, quantized weights, DoRA): use plain HF generate."""


class EngineFull(UserError):
    """The engine's queue is full: the caller should retry later."""


class EngineClosed(UserError):
    pass


@dataclass
class EngineResult:
    token_ids: list[int]  # generated ids; includes the EOS id when EOS stopped the request (as HF generate)
    text: str  # decoded (special tokens skipped), cut at the first stop string; "" without a tokenizer
    finish_reason: str  # "stop" (EOS or stop string), "length", or "cancelled"
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float  # submit -> finished
    ttft_ms: float  # submit -> first token sampled (host view, chunk granularity)


@dataclass
class SamplingParams:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: Sequence[str] = ()
    ignore_eos: bool = False

    @classmethod
    def from_spec(cls, spec) -> "SamplingParams":
        """From a pipeline.specs.GenerationSpec."""
        return cls(
            max_new_tokens=spec.max_new_tokens,
            temperature=spec.temperature if spec.sampling else 0.0,
            top_p=spec.top_p if spec.sampling else 1.0,
            seed=spec.seed,
            stop=tuple(spec.stop),
        )


_ids = itertools.count()


@dataclass(eq=False)
class _Request:
    prompt: list[int]
    params: SamplingParams
    on_text: Optional[TextCallback]
    future: Future
    seed: int
    submitted: float
    id: int = field(default_factory=lambda: next(_ids))
    tokens: list[int] = field(default_factory=list)
    slot: int = -1
    pos: int = 0  # host count of the position of the next decode input
    done: bool = False
    cancelled: bool = False
    first_token_t: Optional[float] = None
    emitted: str = ""
    fresh: bool = False  # prefilled, first token not yet read back
    planned: int = 0  # tokens that launched work will have produced (no chunk is launched past max_new_tokens)
    last_emit: float = 0.0


class RequestHandle:
    """What `Engine.submit` returns: a future of an EngineResult, and a way to cancel."""

    def __init__(self, engine: "Engine", req: _Request):
        self._engine, self._req = engine, req
        self.future: Future = req.future

    def result(self, timeout: Optional[float] = None) -> EngineResult:
        return self.future.result(timeout)

    def cancel(self) -> None:
        """Stop generating; the future resolves with finish_reason 'cancelled' and the tokens so far."""
        self._engine._cancel(self._req)

    def done(self) -> bool:
        return self.future.done()


# ---------------------------------------------------------------- small numeric helpers


def _silu_mul(gu: torch.Tensor) -> torch.Tensor:
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


_M32 = 0xFFFFFFFF


def _uniform(seed: torch.Tensor, pos: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Uniform (0, 1) noise as a pure hash of (seed, position, token id): int64 ops, no overflow."""
    x = (seed * 0x27D4EB2D + pos * 0x165667B1).unsqueeze(-1) + idx * 0x61C88647
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _M32
    x = x ^ (x >> 16)
    return ((x >> 8).float() + 0.5) * (1.0 / (1 << 24))


def _pick(logits: torch.Tensor, temp: torch.Tensor, top_p: torch.Tensor, seed: torch.Tensor,
          pos: torch.Tensor, sampling: bool) -> torch.Tensor:
    """Next token per row: argmax where temp == 0, else a top-p sample keyed by (seed, pos). logits fp32 [b, V]."""
    greedy = logits.argmax(-1)
    if not sampling:
        return greedy
    probs = torch.softmax(logits / temp.clamp_min(1e-5).unsqueeze(-1), dim=-1)
    sp, si = probs.sort(dim=-1, descending=True)
    keep = (sp.cumsum(-1) - sp) < top_p.unsqueeze(-1)  # the most likely token is always kept
    sp = sp.masked_fill(~keep, 0.0)
    race = sp / -torch.log(_uniform(seed, pos, si))  # exponential race == sampling proportional to sp
    sampled = si.gather(-1, race.argmax(-1, keepdim=True)).squeeze(-1)
    return torch.where(temp > 0, sampled, greedy)


# ---------------------------------------------------------------- one decode layer / the head


def _attend(q, k, v, mask, attn: str):
    """Decode attention. q [b, Hk, G, D] (the G query heads of one KV head), k/v [b, Hk, lb, D], mask [b, 1, 1, lb].

    "sdpa": PyTorch's SDPA (eager paths). "reduce": scores and output as fp32 multiply-and-sum reductions,
    which inductor turns into a few well-parallelised kernels (SDPA's kernels run ~b*Hk blocks at batch 1).
    """
    if attn == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scale = q.shape[-1] ** -0.5
    s = (q.float().unsqueeze(3) * k.float().unsqueeze(2)).sum(-1) * scale  # [b, Hk, G, lb]
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return (p.unsqueeze(-1) * v.float().unsqueeze(2)).sum(-2).to(q.dtype)  # [b, Hk, G, D]


def _gemv(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """h @ w.T written as a multiply-and-sum (fp32 accumulation): compiled, inductor emits one Triton reduction
    per weight that also absorbs the producer of h (RMSNorm scaling, SiLU*mul). Only for compiled batch 1:
    eagerly it would materialise [b, N, K]."""
    return (h.float().unsqueeze(-2) * w.float()).sum(-1).to(h.dtype)


def _make_layer(H: int, Hk: int, D: int, eps: float, attn: str, rms=None, rope=None, silu_mul=None,
                gemv: bool = False):
    """One decode layer as a plain function (torch.compile-able, fullgraph).

    Takes the residual stream as (x, d) and returns (x', d'), the pending residual add being done at the
    start of the next layer (or the head), so inductor fuses add + RMSNorm into one kernel.
    gemv: the four projections as multiply-and-sum reductions instead of cuBLAS GEMMs (batch 1, compiled).
    """
    rms, rope, silu_mul = rms or llama_ops.rms_norm, rope or llama_ops.rope, silu_mul or _silu_mul
    lin = _gemv if gemv else F.linear
    G = H // Hk

    def layer(x, d, cos, sin, mask, rows, heads, pos, kc, vc, w_in, w_qkv, w_o, w_post, w_gu, w_down):
        b, lb = x.shape[0], mask.shape[-1]
        x = x + d
        qkv = lin(rms(x, w_in, eps), w_qkv).view(b, H + 2 * Hk, D)
        qk = rope(qkv[:, : H + Hk], cos, sin)
        idx = (rows.view(b, 1), heads.view(1, Hk), pos.view(b, 1))
        kc.index_put_(idx, qk[:, H:])
        vc.index_put_(idx, qkv[:, H + Hk:])
        q = qk[:, :H].reshape(b, Hk, G, D)
        o = _attend(q, kc[:b, :, :lb], vc[:b, :, :lb], mask, attn)
        x = x + lin(o.reshape(b, H * D), w_o)
        return x, lin(silu_mul(lin(rms(x, w_post, eps), w_gu)), w_down)

    return layer


def _make_head(eps: float, rms=None, gemv: bool = False):
    rms = rms or llama_ops.rms_norm
    lin = _gemv if gemv else F.linear

    def head(x, d, w_norm, w_lm, temp, top_p, seed, pos, sampling: bool):
        logits = lin(rms(x + d, w_norm, eps), w_lm).float()
        return _pick(logits, temp, top_p, seed, pos + 1, sampling)

    return head


# ---------------------------------------------------------------- weights


def _linear_weight(mod) -> torch.Tensor:
    """The effective weight of a (possibly PEFT-LoRA-wrapped) nn.Linear, LoRA merged in fp32."""
    if hasattr(mod, "base_layer") and hasattr(mod, "lora_A"):
        base = _linear_weight(mod.base_layer)
        if getattr(mod, "disable_adapters", False):
            return base
        merged = set(getattr(mod, "merged_adapters", []))
        active = mod.active_adapters if isinstance(mod.active_adapters, (list, tuple)) else [mod.active_adapters]
        w = None
        for name in active:
            if name in merged or name not in mod.lora_A:
                continue
            if getattr(mod, "use_dora", {}).get(name, False):
                raise EngineUnsupported("DoRA adapters are not supported by the engine")
            if getattr(mod, "lora_bias", {}).get(name, False):
                raise EngineUnsupported("LoRA biases are not supported by the engine")
            a, b = mod.lora_A[name].weight.float(), mod.lora_B[name].weight.float()
            delta = b @ a
            if getattr(mod, "fan_in_fan_out", False):
                delta = delta.T
            w = (base.float() if w is None else w) + delta * mod.scaling[name]
        return base if w is None else w.to(base.dtype)
    if getattr(mod, "bias", None) is not None:
        raise EngineUnsupported("linear layers with bias are not supported by the engine")
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        # bitsandbytes' Params4bit/Int8Params are packed integer tensors
        raise EngineUnsupported(f"weights of {type(mod).__name__} ({getattr(w, 'dtype', None)}) are not plain 16/32-bit")
    return w.detach()


def _unwrap(model):
    """The LlamaForCausalLM inside a PeftModel (or the model itself)."""
    inner = model
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner


@dataclass
class _Weights:
    embed: torch.Tensor
    layers: list[tuple]  # (w_in, w_qkv, w_o, w_post, w_gate_up, w_down)
    norm: torch.Tensor
    lm_head: torch.Tensor
    inv_freq: torch.Tensor
    rope_scale: float


def extract_weights(model) -> tuple[_Weights, object]:
    """Read (and fuse) the weights of a Llama model; raises EngineUnsupported for anything else."""
    hf = _unwrap(model)
    cfg = hf.config
    if getattr(cfg, "model_type", None) != "llama":
        raise EngineUnsupported(f"model type {getattr(cfg, 'model_type', None)!r} is not Llama")
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise EngineUnsupported("only Llama with SiLU MLP and no biases is supported")
    rope = hf.model.rotary_emb
    rope_type = getattr(rope, "rope_type", "default")
    if "dynamic" in str(rope_type):
        raise EngineUnsupported(f"rope type {rope_type} is not supported")
    with torch.no_grad():
        layers = []
        for layer in hf.model.layers:
            at, mlp = layer.self_attn, layer.mlp
            qkv = torch.cat([_linear_weight(at.q_proj), _linear_weight(at.k_proj), _linear_weight(at.v_proj)], 0)
            gu = torch.cat([_linear_weight(mlp.gate_proj), _linear_weight(mlp.up_proj)], 0)
            layers.append((layer.input_layernorm.weight.detach(), qkv.contiguous(), _linear_weight(at.o_proj),
                           layer.post_attention_layernorm.weight.detach(), gu.contiguous(),
                           _linear_weight(mlp.down_proj)))
        weights = _Weights(
            embed=hf.model.embed_tokens.weight.detach(),
            layers=layers,
            norm=hf.model.norm.weight.detach(),
            lm_head=_linear_weight(hf.lm_head),
            inv_freq=rope.inv_freq.detach().float(),
            rope_scale=float(getattr(rope, "attention_scaling", 1.0)),
        )
    return weights, cfg


def _eos_ids(model, tokenizer) -> list[int]:
    ids = []
    for src in (getattr(tokenizer, "eos_token_id", None), getattr(getattr(_unwrap(model), "generation_config", None), "eos_token_id", None)):
        if src is None:
            continue
        ids += list(src) if isinstance(src, (list, tuple)) else [src]
    return sorted(set(int(i) for i in ids))


# ---------------------------------------------------------------- the engine


class Engine:
    """Continuous-batching generation over one Llama model.

    engine = Engine(model, tokenizer, max_batch=32)
    handle = engine.submit(input_ids, SamplingParams(max_new_tokens=128), on_text=cb)   # thread-safe
    result = handle.result()             # EngineResult
    engine.generate(input_ids, params)   # submit + wait
    engine.close()
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        max_batch: Optional[int] = None,
        max_len: Optional[int] = None,
        max_queue: int = 256,
        chunk: Optional[int] = None,
        use_cuda_graphs: Optional[bool] = None,
        compile_helpers: Optional[bool] = None,
        compile_mode: Optional[str] = None,
        attention: Optional[str] = None,
        batch1_gemv: Optional[bool] = None,
        eos_token_ids: Optional[Sequence[int]] = None,
        prefill_tokens: int = 8192,
        stream_interval_s: float = 0.25,
        idle_exit_s: float = 30.0,
    ):
        weights, cfg = extract_weights(model)
        self.w = weights
        self.tokenizer = tokenizer
        self.device = weights.embed.device
        self.dtype = weights.embed.dtype
        on_cuda = self.device.type == "cuda"
        self.n_layers = len(weights.layers)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.hidden = cfg.hidden_size
        self.eps = cfg.rms_norm_eps
        self.vocab = weights.lm_head.shape[0]
        self.max_len = int(max_len or min(getattr(cfg, "max_position_embeddings", 2048), 4096))
        self.max_batch = int(max_batch or (32 if on_cuda else 8))
        self.max_queue = max_queue
        self.chunk = int(chunk or (8 if on_cuda else 4))
        self.prefill_tokens = max(prefill_tokens, self.max_len)
        self.stream_interval_s = stream_interval_s
        self.idle_exit_s = idle_exit_s
        self.eos = list(eos_token_ids) if eos_token_ids is not None else _eos_ids(model, tokenizer)
        self.use_graphs = on_cuda if use_cuda_graphs is None else (use_cuda_graphs and on_cuda)
        self.info: dict = {"cuda_graphs": self.use_graphs, "compiled_helpers": False, "graph_error": None,
                           "compile_error": None, "lora_merged_privately": hasattr(model, "get_base_model"),
                           "compile_mode": "none", "attention": None, "layer_compile_error": None,
                           "compile_s": 0.0, "batch1_gemv": None}

        S, L, M, D = self.max_batch, self.n_layers, self.max_len, self.head_dim
        dev = self.device
        self.k_cache = torch.zeros(L, S, self.n_kv, M, D, dtype=self.dtype, device=dev)
        self.v_cache = torch.zeros_like(self.k_cache)
        pos = torch.arange(M, device=dev, dtype=torch.float32)
        freqs = pos[:, None] * weights.inv_freq.to(dev)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * weights.rope_scale).to(self.dtype)
        self.sin = (emb.sin() * weights.rope_scale).to(self.dtype)
        self.arange_len = torch.arange(M, device=dev)
        self.rows = torch.arange(S, device=dev)
        self.heads = torch.arange(self.n_kv, device=dev)
        # decode state, advanced by the step itself
        self.tok_buf = torch.zeros(S, dtype=torch.long, device=dev)
        self.pos_buf = torch.zeros(S, dtype=torch.long, device=dev)
        self.temp_buf = torch.zeros(S, dtype=torch.float32, device=dev)
        self.top_p_buf = torch.ones(S, dtype=torch.float32, device=dev)
        self.seed_buf = torch.zeros(S, dtype=torch.long, device=dev)
        self.hist = torch.zeros(self.chunk + 1, S, dtype=torch.long, device=dev)
        self.hist_host = [torch.zeros(self.chunk + 1, S, dtype=torch.long, pin_memory=on_cuda) for _ in range(2)]
        self._host_i = 0

        self.capture_sizes = sorted({s for s in (1, 2, 4, 8, *range(16, S + 1, 8)) if s <= S} | {S})
        self.buckets = sorted({b for b in (256 * 2**i for i in range(16)) if b < M} | {M})
        self._graphs: dict[tuple, object] = {}
        # Batch-1 prefill graphs per prompt-length bucket: (graph, ids, length, row, logits) static tensors.
        # Eager prefill launches ~20 kernels a layer from Python (~17 ms for 64 tokens on an H200, more than
        # a tenth of a 256-token answer); replayed, it costs about its GPU time.
        self.prefill_buckets = [b for b in (16 * 2**i for i in range(16)) if b < M] + [M]
        self._prefill_graphs: dict[int, tuple] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._stream = torch.cuda.Stream(dev) if on_cuda else None

        with torch.inference_mode():  # an inference tensor, as the layer outputs that take its place: same guards
            self._zeros = torch.zeros(S, self.hidden, dtype=self.dtype, device=dev)  # the first layer's pending add

        # Decode-step compilation, a fallback chain (what ran is in self.info["compile_mode"]):
        #   "layer":   each decode layer (add+RMSNorm, QKV, RoPE + K/V write, attention, O, add+RMSNorm, SwiGLU)
        #              and the head compiled whole by inductor (fullgraph), then captured in our CUDA graphs;
        #   "helpers": eager layers calling compiled RMSNorm/RoPE/SiLU*mul (+ SDPA attention);
        #   "none":    all eager (CPU, tests).
        # compile_mode=None reads TINYLLAMA_MCP_ENGINE_COMPILE (layer|helpers|none; 1 = layer, 0 = none).
        if compile_mode is None:
            if compile_helpers is False or not on_cuda:
                compile_mode = "none"
            elif compile_helpers is True:
                compile_mode = "helpers"
            else:
                env = os.environ.get("TINYLLAMA_MCP_ENGINE_COMPILE", "layer").strip().lower()
                compile_mode = {"1": "layer", "0": "none", "": "layer", "false": "none"}.get(env, env)
        if compile_mode not in ("layer", "helpers", "none"):
            raise ValueError(f"compile_mode must be layer, helpers or none, not {compile_mode!r}")
        self._attn_pref = attention or os.environ.get("TINYLLAMA_MCP_ENGINE_ATTENTION") or None
        # batch1_gemv: None = where CUDA graphs run, unless TINYLLAMA_MCP_ENGINE_GEMV=0; True forces the compile
        # (tests; without graphs nothing picks it, so set _b1_choice yourself)
        if batch1_gemv is None:
            batch1_gemv = os.environ.get("TINYLLAMA_MCP_ENGINE_GEMV", "1") != "0" and self.use_graphs
        self._b1_fns = None  # compiled (layer, head) with GEMV-as-reduction projections, for batch 1
        self._layer_b1 = None  # the compiled layer for batch 1 with cuBLAS projections, when it differs
        self._attn_one: Optional[str] = None  # batch-1 attention of the compiled layers
        self._b1_choice: Optional[str] = None  # "gemv" or "mm", decided by timing the first batch-1 graph
        self._rms, self._rope, self._silu_mul = llama_ops.rms_norm, llama_ops.rope, _silu_mul
        self._set_eager_step()
        t0 = time.perf_counter()
        if compile_mode in ("layer", "helpers"):
            self._try_compile()  # prefill always uses the helpers; also the "helpers" decode path
            if self.info["compiled_helpers"]:
                self._set_eager_step()
                self.info["compile_mode"] = "helpers"
        if compile_mode == "layer":
            self._try_compile_layer()
            if self.info["compile_mode"] == "layer" and batch1_gemv:
                self._try_compile_b1_gemv()
            self._check = None  # the test tensors of the compile checks
        self.info["compile_s"] = round(time.perf_counter() - t0, 2)

        # scheduling state
        self._cv = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._slots: list[Optional[_Request]] = [None] * S
        self._closing = False
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        self.stats = {"steps": 0, "chunks": 0, "prefills": 0, "finished": 0}

    # ------------------------------------------------------------ public API

    def submit(self, input_ids: Sequence[int], params: Optional[SamplingParams] = None, *,
               on_text: Optional[TextCallback] = None) -> RequestHandle:
        """Queue a request (thread-safe). Raises EngineFull when the queue is full, UserError when it cannot fit.

        on_text(text_so_far, completion_tokens) is called from the engine thread, at most every
        `stream_interval_s` and once at the end, with the partial text (stop strings already cut);
        it must return quickly (hand the work to your event loop). Needs a tokenizer.
        """
        params = params or SamplingParams()
        prompt = [int(t) for t in input_ids]
        if not prompt:
            raise UserError("the prompt is empty; pass at least one token")
        if len(prompt) + params.max_new_tokens > self.max_len:
            raise UserError(
                f"prompt of {len(prompt)} tokens + max_new_tokens {params.max_new_tokens} exceeds this model's "
                f"context of {self.max_len} tokens; shorten the prompt or lower max_new_tokens"
            )
        if max(prompt) >= self.vocab or min(prompt) < 0:
            raise UserError(f"token ids must be in [0, {self.vocab})")
        if (on_text is not None or params.stop) and self.tokenizer is None:
            raise UserError("streaming text and stop strings need the engine to have a tokenizer")
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        req = _Request(prompt, params, on_text, Future(), seed & _M32, time.perf_counter())
        req.future.set_running_or_notify_cancel()
        with self._cv:
            if self._error is not None:
                raise EngineClosed(f"the generation engine failed earlier ({self._error!r}); reload the model")
            if self._closing:
                raise EngineClosed("the generation engine is shut down")
            if len(self._waiting) >= self.max_queue:
                raise EngineFull(
                    f"the generation queue is full ({self.max_queue} requests waiting, {self.max_batch} running); "
                    "retry in a few seconds"
                )
            self._waiting.append(req)
            self._ensure_thread()
            self._cv.notify_all()
        return RequestHandle(self, req)

    def generate(self, input_ids: Sequence[int], params: Optional[SamplingParams] = None, *,
                 on_text: Optional[TextCallback] = None, timeout: Optional[float] = None) -> EngineResult:
        return self.submit(input_ids, params, on_text=on_text).result(timeout)

    def load(self) -> dict:
        """Running and queued request counts (for status displays)."""
        with self._cv:
            return {"running": sum(r is not None for r in self._slots), "queued": len(self._waiting),
                    "max_batch": self.max_batch, "max_queue": self.max_queue}

    def warmup(self, batch_sizes: Optional[Sequence[int]] = None, buckets: Optional[Sequence[int]] = None,
               sampling: Sequence[bool] = (False,)) -> float:
        """Capture the decode graphs up front (else they are captured on first use). Returns seconds taken.

        Call before any request is submitted.
        """
        t0 = time.perf_counter()
        if not self.use_graphs:
            return 0.0
        with self._cv:
            assert not self._waiting and all(s is None for s in self._slots), "warmup() before serving"
            for b in batch_sizes or self.capture_sizes:
                for lb in buckets or self.buckets:
                    for smp in sampling:
                        self._graph(self._pad_batch(b), lb, smp)
                        if not self.use_graphs:
                            return time.perf_counter() - t0
        torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def close(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ setup helpers

    def _try_compile(self) -> None:
        try:
            opts = dict(dynamic=True, fullgraph=True)
            rms, rope, silu = (torch.compile(f, **opts) for f in (llama_ops.rms_norm, llama_ops.rope, _silu_mul))
            with torch.inference_mode():  # as prefill and decode call them (grad mode is guarded)
                x = torch.randn(3, self.hidden, device=self.device, dtype=self.dtype)
                rms(x, self.w.norm, self.eps)
                qk = torch.randn(3, self.n_heads + self.n_kv, self.head_dim, device=self.device, dtype=self.dtype)
                rope(qk, self.cos[:3, None], self.sin[:3, None])
                silu(torch.randn(3, self.w.layers[0][4].shape[0], device=self.device, dtype=self.dtype))
            self._rms, self._rope, self._silu_mul = rms, rope, silu
            self.info["compiled_helpers"] = True
        except Exception as exc:  # compile is an optimisation only
            log.warning("engine: torch.compile of the fused helpers failed, running them eagerly: %r", exc)
            self.info["compile_error"] = repr(exc)[:500]

    def _set_eager_step(self) -> None:
        attn = self._attn_pref or "sdpa"
        self._layer_fn = _make_layer(self.n_heads, self.n_kv, self.head_dim, self.eps, attn,
                                     self._rms, self._rope, self._silu_mul)
        self._head_fn = _make_head(self.eps, self._rms)
        self.info["attention"] = attn

    def _try_compile_layer(self) -> None:
        """Compile the decode layer and head whole; check them against the eager functions on one layer.

        Attention differs by batch size (unless TINYLLAMA_MCP_ENGINE_ATTENTION names one): "reduce" at batch 1,
        where SDPA's kernels leave most of the GPU idle, and SDPA above, where it is the faster one.
        """
        attn_one = self._attn_pref or "reduce"
        attn_many = self._attn_pref or "sdpa"
        try:
            import torch._dynamo

            cfg = torch._dynamo.config
            for name, val in (("recompile_limit", 64), ("cache_size_limit", 64), ("accumulated_recompile_limit", 512)):
                if hasattr(cfg, name):
                    setattr(cfg, name, max(getattr(cfg, name), val))
            head = self._compiled(_make_head(self.eps))
            layer_one, check = self._compile_checked_layer(attn_one, 1)
            x, d, args, ref, kc0, vc0 = check
            hp = dict(temp=self.temp_buf[:1], top_p=self.top_p_buf[:1], seed=self.seed_buf[:1], pos=args[-1])
            with torch.inference_mode():
                t_ref = _make_head(self.eps)(ref[0], ref[1], self.w.norm, self.w.lm_head, sampling=False, **hp)
                t_got = head(ref[0], ref[1], self.w.norm, self.w.lm_head, sampling=False, **hp)
            if t_ref.shape != t_got.shape:
                raise RuntimeError("compiled head returned a wrong shape")
            # Checked at batch 2, so batch 1 keeps its own specialised code.
            layer_many = layer_one if attn_many == attn_one else self._compile_checked_layer(attn_many, 2)[0]
            self._layer_fn, self._layer_b1, self._head_fn = layer_many, layer_one, head
            self.info["compile_mode"] = "layer"
            self.info["attention"] = attn_one if attn_one == attn_many else f"{attn_one} at batch 1, {attn_many} above"
            self._attn_one = attn_one
            self._check = (x, d, args, ref, hp, kc0, vc0)
        except Exception as exc:
            log.warning("engine: compiling the decode layer failed, falling back to %s: %r",
                        self.info["compile_mode"], exc)
            self.info["layer_compile_error"] = repr(exc)[:800]

    @staticmethod
    def _compiled(fn):
        # dynamic=None: the first shapes (e.g. batch 1, first bucket) compile static; when the bucket, then the
        # batch size change, it recompiles once each with those dims symbolic.
        # coordinate_descent_tuning: as gpt-fast, tunes the reductions' block sizes.
        return torch.compile(fn, fullgraph=True, dynamic=None, options={"coordinate_descent_tuning": True})

    def _compile_checked_layer(self, attn: str, b: int):
        """A compiled decode layer, checked against its eager twin at batch b on layer 0's weights."""
        eager_layer = _make_layer(self.n_heads, self.n_kv, self.head_dim, self.eps, attn)
        layer = self._compiled(eager_layer)
        dev, dt, lb = self.device, self.dtype, self.buckets[0]
        # Test inputs made as the decode step makes them (inference tensors or not), so that the code compiled
        # here is the code decode reuses (a dispatch-key mismatch would recompile).
        gen = torch.Generator(device=dev).manual_seed(0)
        pos = torch.full((b,), 5, device=dev, dtype=torch.long)
        with torch.inference_mode():
            x = torch.randn(b, self.hidden, device=dev, dtype=dt, generator=gen)
            d = torch.randn(b, self.hidden, device=dev, dtype=dt, generator=gen) * 0.1
            cos, sin = self.cos[pos].view(b, 1, -1), self.sin[pos].view(b, 1, -1)
            mask = (self.arange_len[:lb].view(1, lb) <= pos.view(b, 1)).view(b, 1, 1, lb)
        # scratch caches: the real ones stay untouched
        kc = torch.randn(self.k_cache.shape[1:], device=dev, dtype=dt, generator=gen)
        vc = torch.randn(self.k_cache.shape[1:], device=dev, dtype=dt, generator=gen)
        kc0, vc0 = kc.clone(), vc.clone()
        kc2, vc2 = kc.clone(), vc.clone()
        args = (cos, sin, self._bucket_dynamic(mask), self.rows[:b], self.heads, pos)
        with torch.inference_mode():
            ref = eager_layer(x, d, *args, kc, vc, *self.w.layers[0])
            got = layer(x, d, *args, kc2, vc2, *self.w.layers[0])
        self._check_close(ref + (kc, vc), got + (kc2, vc2), f"compiled decode layer ({attn}, batch {b})")
        return layer, (x, d, args, ref, kc0, vc0)

    @staticmethod
    def _check_close(refs, gots, what: str) -> None:
        for r, g_ in zip(refs, gots):
            err = (r.float() - g_.float()).abs().max().item()
            tol = 0.05 * max(r.float().abs().max().item(), 1e-3) + 1e-3
            if not err <= tol:
                raise RuntimeError(f"{what} differs from eager: max abs err {err:.3g} > {tol:.3g}")

    @staticmethod
    def _bucket_dynamic(mask: torch.Tensor) -> torch.Tensor:
        """Hint that the cache bucket (mask's last dim) be compiled symbolic from the first call: one compile
        fewer per variant. Soft: where dynamo specialises the dim anyway, it just recompiles later."""
        try:
            import torch._dynamo

            torch._dynamo.maybe_mark_dynamic(mask, 3)
        except Exception:
            pass
        return mask

    def _try_compile_b1_gemv(self) -> None:
        """The batch-1 variant whose projections are Triton reductions; used if its graph times faster."""
        try:
            x, d, args, ref, hp, kc, vc = self._check
            layer = self._compiled(_make_layer(self.n_heads, self.n_kv, self.head_dim, self.eps, self._attn_one,
                                               gemv=True))
            head = self._compiled(_make_head(self.eps, gemv=True))
            with torch.inference_mode():
                got = layer(x, d, *args, kc, vc, *self.w.layers[0])
                self._check_close(ref, got, "compiled batch-1 GEMV decode layer")
                t_ref = self._head_fn(ref[0], ref[1], self.w.norm, self.w.lm_head, sampling=False, **hp)
                t_got = head(ref[0], ref[1], self.w.norm, self.w.lm_head, sampling=False, **hp)
                if t_ref.shape != t_got.shape:
                    raise RuntimeError("compiled batch-1 GEMV head returned a wrong shape")
            self._b1_fns = (layer, head)
        except Exception as exc:
            log.warning("engine: compiling the batch-1 GEMV decode layer failed (cuBLAS projections it is): %r", exc)
            self.info["batch1_gemv"] = {"error": repr(exc)[:500]}

    def _pad_batch(self, n: int) -> int:
        if not self.use_graphs:
            return n
        return next(s for s in self.capture_sizes if s >= n)

    def _bucket(self, need: int) -> int:
        need = min(need, self.max_len)
        if not self.use_graphs:
            return need
        return next(b for b in self.buckets if b >= need)

    # ------------------------------------------------------------ model forward

    def _layer_mlp(self, x, w_post, w_gu, w_down):
        h = self._rms(x, w_post, self.eps)
        return torch.addmm(x, self._silu_mul(F.linear(h, w_gu)), w_down.t())

    @torch.inference_mode()
    def _prefill_forward(self, ids: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """ids [n, T] right-padded; writes K/V rows; returns fp32 logits of each last real token [n, V]."""
        n, T = ids.shape
        H, Hk, D = self.n_heads, self.n_kv, self.head_dim
        x = F.embedding(ids, self.w.embed).view(n * T, self.hidden)
        cos, sin = self.cos[:T].view(1, T, 1, D), self.sin[:T].view(1, T, 1, D)
        for li, (w_in, w_qkv, w_o, w_post, w_gu, w_down) in enumerate(self.w.layers):
            h = self._rms(x, w_in, self.eps)
            qkv = F.linear(h, w_qkv).view(n, T, H + 2 * Hk, D)
            qk = self._rope(qkv[:, :, : H + Hk], cos, sin)
            q = qk[:, :, :H].transpose(1, 2)
            k = qk[:, :, H:].transpose(1, 2)
            v = qkv[:, :, H + Hk:].transpose(1, 2)
            self.k_cache[li][rows, :, :T] = k
            self.v_cache[li][rows, :, :T] = v
            g = H // Hk
            o = F.scaled_dot_product_attention(q, k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1),
                                               is_causal=True)
            x = torch.addmm(x, o.transpose(1, 2).reshape(n * T, H * D), w_o.t())
            x = self._layer_mlp(x, w_post, w_gu, w_down)
        last = x.view(n, T, self.hidden)[torch.arange(n, device=ids.device), lengths - 1]
        return F.linear(self._rms(last, self.w.norm, self.eps), self.w.lm_head).float()

    def _step_core(self, b: int, lb: int, sampling: bool) -> torch.Tensor:
        """One decode step for rows [0, b) attending over cache positions [0, lb). Writes K/V at pos."""
        D = self.head_dim
        tok, pos = self.tok_buf[:b], self.pos_buf[:b]
        x = F.embedding(tok, self.w.embed)
        d = self._zeros[:b]
        cos, sin = self.cos[pos].view(b, 1, D), self.sin[pos].view(b, 1, D)
        mask = (self.arange_len[:lb].view(1, lb) <= pos.view(b, 1)).view(b, 1, 1, lb)
        if self.info["compile_mode"] == "layer":
            self._bucket_dynamic(mask)
        args = (cos, sin, mask, self.rows[:b], self.heads, pos)
        layer, head = self._layer_fn, self._head_fn
        if b == 1 and self._b1_choice == "gemv" and self._b1_fns is not None:
            layer, head = self._b1_fns
        elif b == 1 and self._layer_b1 is not None:
            layer = self._layer_b1
        for li, ws in enumerate(self.w.layers):
            x, d = layer(x, d, *args, self.k_cache[li], self.v_cache[li], *ws)
        return head(x, d, self.w.norm, self.w.lm_head, self.temp_buf[:b], self.top_p_buf[:b],
                    self.seed_buf[:b], pos, sampling)

    def _step(self, b: int, lb: int, sampling: bool) -> None:
        nxt = self._step_core(b, lb, sampling)
        self.tok_buf[:b].copy_(nxt)
        self.pos_buf[:b].add_(1).clamp_(max=self.max_len - 1)

    def _graph(self, b: int, lb: int, sampling: bool):
        key = (b, lb, sampling)
        g = self._graphs.get(key)
        if g is not None or not self.use_graphs:
            return g
        try:
            if b == 1 and self._b1_fns is not None and self._b1_choice is None:
                g = self._choose_b1(lb, sampling)
            else:
                g = self._capture(b, lb, sampling)
            self._graphs[key] = g
            return g
        except Exception as exc:
            if b == 1 and self._b1_choice == "gemv":
                log.warning("engine: batch-1 GEMV graph failed for %s, using cuBLAS projections: %r", key, exc)
                self._b1_choice, self._b1_fns = "mm", None
                self.info["batch1_gemv"] = dict(self.info["batch1_gemv"] or {}, error=repr(exc)[:500], choice="mm")
                torch.cuda.synchronize(self.device)
                return self._graph(b, lb, sampling)
            if self.info["compile_mode"] == "layer":
                # the compiled layer could not be captured (or recompiled at capture): try the helpers path
                log.warning("engine: CUDA graph capture with the compiled decode layer failed for %s, "
                            "falling back to the helpers path: %r", key, exc)
                self.info["layer_compile_error"] = ("capture: " + repr(exc))[:800]
                self._graphs.clear()
                try:
                    torch.cuda.synchronize(self.device)
                except Exception as sync_exc:
                    self.info["graph_error"] = f"synchronize after a failed capture: {sync_exc!r}"[:500]
                    raise
                self._set_eager_step()
                self._b1_fns, self._b1_choice, self._layer_b1 = None, None, None
                self.info["compile_mode"] = "helpers" if self.info["compiled_helpers"] else "none"
                self._pool = torch.cuda.graph_pool_handle()
                return self._graph(b, lb, sampling)
            log.warning("engine: CUDA graph capture failed for %s, decoding eagerly from now on: %r", key, exc)
            self.info["graph_error"] = repr(exc)[:500]
            self.info["cuda_graphs"] = False
            self.use_graphs = False
            self._graphs.clear()
            try:
                torch.cuda.synchronize(self.device)
            except Exception as sync_exc:  # a sticky CUDA error: the engine thread will fail its requests
                self.info["graph_error"] += f"; then synchronize failed: {sync_exc!r}"[:300]
                raise
            return None

    def _capture(self, b: int, lb: int, sampling: bool):
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):  # idempotent: rewrites the same K/V at the same positions
                self._step_core(b, lb, sampling)
        torch.cuda.current_stream(self.device).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(g, pool=self._pool, capture_error_mode="thread_local"):
            self._step(b, lb, sampling)
        return g

    def _time_graph(self, g, n: int = 30) -> float:
        """ms per replay. Replays advance row 0's token/position: saved and restored. The K/V they write lie
        past row 0's position, where decode overwrites them before attending to them."""
        saved = self.tok_buf[:1].clone(), self.pos_buf[:1].clone()
        g.replay()
        torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        for _ in range(n):
            g.replay()
        torch.cuda.synchronize(self.device)
        ms = (time.perf_counter() - t0) * 1000 / n
        self.tok_buf[:1].copy_(saved[0])
        self.pos_buf[:1].copy_(saved[1])
        return ms

    def _choose_b1(self, lb: int, sampling: bool):
        """Capture batch 1 with cuBLAS projections and with GEMV reductions, time both, keep the faster."""
        info: dict = {"bucket": lb}
        self._b1_choice = "mm"
        g_mm = self._capture(1, lb, sampling)
        info["mm_step_ms"] = round(self._time_graph(g_mm), 4)
        try:
            self._b1_choice = "gemv"
            g_gemv = self._capture(1, lb, sampling)
            info["gemv_step_ms"] = round(self._time_graph(g_gemv), 4)
        except Exception as exc:
            log.warning("engine: batch-1 GEMV graph failed, using cuBLAS projections: %r", exc)
            info["error"] = repr(exc)[:500]
            torch.cuda.synchronize(self.device)
            g_gemv = None
        if g_gemv is not None and info["gemv_step_ms"] < info["mm_step_ms"]:
            self._b1_choice, g = "gemv", g_gemv
        else:
            self._b1_choice, g, self._b1_fns = "mm", g_mm, None
        info["choice"] = self._b1_choice
        self.info["batch1_gemv"] = info
        return g

    # ------------------------------------------------------------ the scheduler thread

    def _ensure_thread(self) -> None:
        # Under self._cv. The thread clears self._thread (under the lock) when it exits.
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="generation-engine", daemon=True)
            self._thread.start()

    def _cancel(self, req: _Request) -> None:
        with self._cv:
            req.cancelled = True
            if req in self._waiting:
                self._waiting.remove(req)
                self._finish(req, "cancelled")

    def _run(self) -> None:
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
                with torch.cuda.stream(self._stream), torch.inference_mode():
                    self._loop()
            else:
                with torch.inference_mode():
                    self._loop()
        except BaseException as exc:  # fail every request rather than leave callers hanging
            log.exception("generation engine failed")
            with self._cv:
                self._error = exc
                self._thread = None
                pending = [r for r in self._slots if r is not None] + list(self._waiting)
                self._waiting.clear()
                self._slots = [None] * self.max_batch
            for r in pending:
                if not r.future.done():
                    r.future.set_exception(exc)

    def _loop(self) -> None:
        inflight = None
        while True:
            with self._cv:
                while not self._closing and inflight is None and not self._waiting and not any(self._slots):
                    if not self._cv.wait(timeout=self.idle_exit_s):
                        self._thread = None  # idle: let the thread go (a new one starts on submit)
                        return
                if self._closing:
                    pending = [r for r in self._slots if r is not None] + list(self._waiting)
                    self._waiting.clear()
                    for r in pending:
                        self._finish(r, "cancelled")
                    self._thread = None
                    return
                admitted = self._admit()
            if admitted:
                self._prefill(admitted)
            launched = self._launch() if any(self._slots) else None
            if inflight is not None:
                self._process(*inflight)
            inflight = launched
            self._compact()

    def _admit(self) -> list[_Request]:
        """Pop waiting requests into free slots (under the lock), within the prefill token budget."""
        out, longest = [], 0
        free = [i for i, r in enumerate(self._slots) if r is None]
        while self._waiting and free:
            req = self._waiting[0]
            if req.cancelled:
                self._waiting.popleft()
                continue
            longest = max(longest, len(req.prompt))
            if out and longest * (len(out) + 1) > self.prefill_tokens:  # right-padded tokens of one prefill
                break
            self._waiting.popleft()
            req.slot = free.pop(0)
            self._slots[req.slot] = req
            out.append(req)
        return out

    def _prefill(self, reqs: list[_Request]) -> None:
        dev = self.device
        T = max(len(r.prompt) for r in reqs)
        pin = dev.type == "cuda"

        def h2d(data, dtype):
            t = torch.tensor(data, dtype=dtype)
            return t.pin_memory().to(dev, non_blocking=True) if pin else t

        lengths = h2d([len(r.prompt) for r in reqs], torch.long)
        rows = h2d([r.slot for r in reqs], torch.long)
        temp = h2d([float(r.params.temperature) for r in reqs], torch.float32)
        top_p = h2d([float(r.params.top_p) for r in reqs], torch.float32)
        seed = h2d([r.seed for r in reqs], torch.long)
        logits = self._prefill_graphed(reqs[0], h2d) if len(reqs) == 1 and self.use_graphs else None
        if logits is None:
            ids = h2d([r.prompt + [0] * (T - len(r.prompt)) for r in reqs], torch.long)
            logits = self._prefill_forward(ids, lengths, rows)
        first = _pick(logits, temp, top_p, seed, lengths, sampling=any(r.params.temperature > 0 for r in reqs))
        self.tok_buf[rows] = first
        self.pos_buf[rows] = lengths
        self.temp_buf[rows] = temp
        self.top_p_buf[rows] = top_p
        self.seed_buf[rows] = seed
        for r in reqs:
            r.pos = len(r.prompt)
            r.fresh = True
            r.planned = 1
        self.stats["prefills"] += 1

    def _prefill_graphed(self, req: _Request, h2d) -> Optional[torch.Tensor]:
        """One prompt's prefill replayed from a CUDA graph of its length bucket (right-padded: causal attention
        keeps the pads out of the real tokens, and decode overwrites their K/V before attending to them).
        None where no graph can run: the caller prefills eagerly."""
        T = len(req.prompt)
        bucket = next((b for b in self.prefill_buckets if b >= T), None)
        if bucket is None or self.info.get("prefill_graph_error"):
            return None
        entry = self._prefill_graphs.get(bucket)
        if entry is None:
            try:
                entry = self._prefill_graphs[bucket] = self._capture_prefill(bucket, req.slot)
            except Exception as exc:
                log.warning("engine: capturing the batch-1 prefill failed, prefilling eagerly: %r", exc)
                self.info["prefill_graph_error"] = repr(exc)[:500]
                torch.cuda.synchronize(self.device)
                return None
        graph, ids, length, row, logits = entry
        ids.zero_()
        ids[0, :T].copy_(h2d([req.prompt], torch.long)[0])
        length.fill_(T)
        row.fill_(req.slot)
        graph.replay()
        return logits

    def _capture_prefill(self, bucket: int, slot: int) -> tuple:
        """Capture at `slot`, the slot about to be prefilled: the warm-up runs write its cache rows, no other's."""
        dev = self.device
        ids = torch.zeros(1, bucket, dtype=torch.long, device=dev)
        length = torch.full((1,), bucket, dtype=torch.long, device=dev)
        row = torch.full((1,), slot, dtype=torch.long, device=dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):  # compiles the helpers for this shape outside the capture
                self._prefill_forward(ids, length, row)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            logits = self._prefill_forward(ids, length, row)
        return graph, ids, length, row, logits

    def _launch(self):
        """Queue `chunk` decode steps for the busy rows; return what _process needs to read them back."""
        busy = [(i, r) for i, r in enumerate(self._slots)
                if r is not None and (r.planned < r.params.max_new_tokens or r.fresh)]
        if not busy:
            return None
        n = busy[-1][0] + 1
        b = self._pad_batch(n)
        k = self.chunk
        lb = self._bucket(max(r.pos for _, r in busy) + k + 1)
        sampling = any(r.params.temperature > 0 for _, r in busy)
        fresh = {i for i, r in busy if r.fresh}
        for _, r in busy:
            r.fresh = False
            r.pos += k
            r.planned += k
        self.hist[0, :b].copy_(self.tok_buf[:b])
        g = self._graph(b, lb, sampling)
        for j in range(1, k + 1):
            if g is not None:
                g.replay()
            else:
                self._step(b, lb, sampling)
            self.hist[j, :b].copy_(self.tok_buf[:b])
        host = self.hist_host[self._host_i]
        self._host_i ^= 1
        host[:, :b].copy_(self.hist[:, :b], non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self.stats["steps"] += k
        self.stats["chunks"] += 1
        return busy, fresh, host, event

    def _process(self, busy, fresh, host, event) -> None:
        if event is not None:
            event.synchronize()
        now = time.perf_counter()
        cols = host.T.tolist()  # [slot][k+1]
        for slot, req in busy:
            if req.done:
                continue
            new = cols[slot] if slot in fresh else cols[slot][1:]
            if req.first_token_t is None and new:
                req.first_token_t = now
            reason = None
            if req.cancelled:
                reason = "cancelled"
            else:
                for t in new:
                    req.tokens.append(t)
                    if t in self.eos and not req.params.ignore_eos:
                        reason = "stop"
                        break
                    if len(req.tokens) >= req.params.max_new_tokens:
                        reason = "length"
                        break
            if reason is None and req.params.stop and self._stop_hit(req):
                reason = "stop"
            if reason is not None:
                with self._cv:
                    self._finish(req, reason)
            elif req.on_text is not None and now - req.last_emit >= self.stream_interval_s:
                req.last_emit = now
                self._emit(req, final=False)

    # -------------------------------------------------------------- text, stop strings, finishing

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    def _stop_hit(self, req: _Request) -> bool:
        text = self._decode(req.tokens)
        return any(s in text for s in req.params.stop)

    def _text(self, req: _Request) -> str:
        text = self._decode(req.tokens)
        cuts = [i for i in (text.find(s) for s in req.params.stop) if i >= 0]
        return text[: min(cuts)] if cuts else text

    def _emit(self, req: _Request, final: bool) -> None:
        text = self._text(req)
        if not final and req.params.stop:  # hold back what could be the start of a stop string
            hold = max(len(s) for s in req.params.stop) - 1
            text = text[: max(len(text) - hold, 0)]
        if text != req.emitted or final:
            req.emitted = text
            try:
                req.on_text(text, len(req.tokens))
            except Exception:  # a broken callback must not stop the engine
                log.exception("engine: on_text callback failed")

    def _finish(self, req: _Request, reason: str) -> None:
        """Under self._cv: release the slot and resolve the future."""
        if req.done:
            return
        req.done = True
        if 0 <= req.slot < len(self._slots) and self._slots[req.slot] is req:
            self._slots[req.slot] = None
        now = time.perf_counter()
        text = self._text(req) if self.tokenizer is not None else ""
        if req.on_text is not None and self.tokenizer is not None:
            req.emitted = text
            try:
                req.on_text(text, len(req.tokens))
            except Exception:
                log.exception("engine: on_text callback failed")
        self.stats["finished"] += 1
        req.future.set_result(EngineResult(
            token_ids=list(req.tokens), text=text, finish_reason=reason, prompt_tokens=len(req.prompt),
            completion_tokens=len(req.tokens), latency_ms=round((now - req.submitted) * 1000, 2),
            ttft_ms=round(((req.first_token_t or now) - req.submitted) * 1000, 2),
        ))

    def _compact(self) -> None:
        """Move the highest busy rows into lower free rows, so the padded batch stays small."""
        with self._cv:
            while True:
                busy = [i for i, r in enumerate(self._slots) if r is not None]
                free = [i for i, r in enumerate(self._slots) if r is None]
                if not busy or not free or free[0] > busy[-1]:
                    return
                src, dst = busy[-1], free[0]
                req = self._slots[src]
                for buf in (self.tok_buf, self.pos_buf, self.temp_buf, self.top_p_buf, self.seed_buf):
                    buf[dst] = buf[src]
                hi = min(req.pos + 1, self.max_len)
                self.k_cache[:, dst, :, :hi] = self.k_cache[:, src, :, :hi]
                self.v_cache[:, dst, :, :hi] = self.v_cache[:, src, :, :hi]
                self._slots[dst], self._slots[src] = req, None
                req.slot = dst
