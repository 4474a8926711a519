"""The model runner: the KV cache, the decode state, and the prefill and decode steps over them.

- KV cache: two tensors [layers, slots, kv_heads, max_len, head_dim], allocated once; a request holds one
  slot (row) from prefill to finish.
- Prefill: the new requests, right-padded to one length, in one causal forward that writes their K/V rows
  and samples their first token on the GPU (a lone request replays the prefill graph of its length bucket).
- Decode: one step = embed -> layers -> head -> sampling -> next input, all on the GPU, with the state (input
  token, position) in static buffers the step itself advances, so that CUDA graphs can replay it.
- The host never waits per token: a chunk of steps is launched back to back, its tokens copied to pinned
  memory once, and read while the next chunk already runs.
On CPU the same code runs eagerly, without graphs. Only the engine thread calls into a runner.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from tinyllama_mcp.pipeline.engine.config import EngineConfig
from tinyllama_mcp.pipeline.engine.graphs import CudaGraphs
from tinyllama_mcp.pipeline.engine.info import EngineInfo
from tinyllama_mcp.pipeline.engine.kernels import DecodeKernels, mark_bucket_dynamic
from tinyllama_mcp.pipeline.engine.lora import LoraTable, lora_delta
from tinyllama_mcp.pipeline.engine.sampling import pick_tokens
from tinyllama_mcp.pipeline.engine.weights import LlamaWeights


class ModelRunner:
    def __init__(self, weights: LlamaWeights, config: EngineConfig, info: EngineInfo):
        """config: resolved (see config.resolve_config)."""
        self.w = weights
        self.device, self.dtype = weights.embed.device, weights.embed.dtype
        on_cuda = self.device.type == "cuda"
        self.max_batch, self.max_len, self.chunk = config.max_batch, config.max_len, config.chunk
        self.n_heads, self.n_kv, self.head_dim = weights.n_heads, weights.n_kv_heads, weights.head_dim
        self.hidden, self.eps, self.vocab = weights.hidden, weights.eps, weights.vocab

        S, L, M, D, dev = self.max_batch, len(weights.layers), self.max_len, self.head_dim, self.device
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
        self.slot_buf = torch.zeros(S, dtype=torch.long, device=dev)  # each row's adapter slot (0: none)
        self.lora: Optional[LoraTable] = None  # the adapters served beside the base (add_adapter)
        # a chunk's tokens: row 0 its inputs, row j the output of step j; two pinned host copies, alternated
        self.hist = torch.zeros(self.chunk + 1, S, dtype=torch.long, device=dev)
        self.hist_host = [torch.zeros(self.chunk + 1, S, dtype=torch.long, pin_memory=on_cuda) for _ in range(2)]
        self._host_i = 0
        self.stream = torch.cuda.Stream(dev) if on_cuda else None
        with torch.inference_mode():  # an inference tensor, as the layer outputs that take its place: same guards
            self._zeros = torch.zeros(S, self.hidden, dtype=self.dtype, device=dev)  # the first layer's pending add

        self.kernels = DecodeKernels(weights, info, config.attention)
        self.graphs = CudaGraphs(self, self.kernels, info)
        self.kernels.compile(config.compile_mode, config.batch1_gemv, probe=self, bucket=self.graphs.buckets[0])

    @contextlib.contextmanager
    def thread_context(self):
        """What the engine thread runs under: inference mode, and on CUDA this device and the runner's stream."""
        if self.stream is None:
            with torch.inference_mode():
                yield
            return
        torch.cuda.set_device(self.device)
        with torch.cuda.stream(self.stream), torch.inference_mode():
            yield

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------ prefill

    def to_device(self, data, dtype):
        """Host data as a device tensor (through pinned memory on CUDA, without waiting)."""
        t = torch.tensor(data, dtype=dtype)
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    def prefill(self, prompts: Sequence[list[int]], rows: Sequence[int], temperatures: Sequence[float],
                top_ps: Sequence[float], seeds: Sequence[int], slots: Optional[Sequence[int]] = None) -> None:
        """Write the prompts' K/V into their rows and put each one's first token and sampling state there.
        slots: each prompt's adapter slot in self.lora (None: the base for all)."""
        lengths, rows_t, temp, top_p, seed, slots_t = self.prefill_inputs(prompts, rows, temperatures, top_ps, seeds,
                                                                          slots)
        logits = None
        if len(prompts) == 1 and self.graphs.enabled and slots_t is None:
            logits = self.graphs.prefill_logits(prompts[0], rows[0], self.to_device)
        if logits is None:
            logits = self.prefill_forward(self.padded(prompts), lengths, rows_t, slots=slots_t)
        first = pick_tokens(logits, temp, top_p, seed, lengths, sampling=any(t > 0 for t in temperatures))
        self.set_state(rows_t, first, lengths, temp, top_p, seed, slots_t)

    def prefill_inputs(self, prompts, rows, temperatures, top_ps, seeds, slots=None) -> tuple:
        """A prefill group's (lengths, rows, temperatures, top_ps, seeds, adapter slots or None) as device tensors."""
        put = self.to_device
        return (put([len(p) for p in prompts], torch.long), put(list(rows), torch.long),
                put([float(t) for t in temperatures], torch.float32), put([float(p) for p in top_ps], torch.float32),
                put(list(seeds), torch.long),
                put(list(slots), torch.long) if slots is not None and any(slots) else None)

    def padded(self, prompts: Sequence[list[int]]) -> torch.Tensor:
        """The prompts right-padded to the longest, on the device."""
        T = max(len(p) for p in prompts)
        return self.to_device([p + [0] * (T - len(p)) for p in prompts], torch.long)

    def set_state(self, rows, first, lengths, temp, top_p, seed, slots=None) -> None:
        """Put these rows' first decode input, its position and their sampling settings into the decode state."""
        self.slot_buf[rows] = 0 if slots is None else slots
        self.tok_buf[rows] = first
        self.pos_buf[rows] = lengths
        self.temp_buf[rows] = temp
        self.top_p_buf[rows] = top_p
        self.seed_buf[rows] = seed

    @torch.inference_mode()
    def prefill_forward(self, ids: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor, keep_hidden: bool = False,
                        slots: Optional[torch.Tensor] = None):
        """ids [n, T] right-padded; writes K/V rows; returns fp32 logits of each last real token [n, V].

        keep_hidden: also the final-normed hidden state of every position [n, T, hidden] (prompt scoring).
        slots: each prompt's adapter slot [n] in self.lora."""
        n, T = ids.shape
        H, Hk, D = self.n_heads, self.n_kv, self.head_dim
        rms, rope = self.kernels.rms, self.kernels.rope
        x = F.embedding(ids, self.w.embed).view(n * T, self.hidden)
        cos, sin = self.cos[:T].view(1, T, 1, D), self.sin[:T].view(1, T, 1, D)

        def lin(h, w, li, group):
            y = F.linear(h, w)
            if slots is None:
                return y
            return y + lora_delta(h.view(n, T, -1), *self.lora.tensors[li][group], slots).view(n * T, -1)

        for li, (w_in, w_qkv, w_o, w_post, w_gu, w_down) in enumerate(self.w.layers):
            h = rms(x, w_in, self.eps)
            qkv = lin(h, w_qkv, li, 0).view(n, T, H + 2 * Hk, D)
            qk = rope(qkv[:, :, : H + Hk], cos, sin)
            q = qk[:, :, :H].transpose(1, 2)
            k = qk[:, :, H:].transpose(1, 2)
            v = qkv[:, :, H + Hk:].transpose(1, 2)
            self.k_cache[li][rows, :, :T] = k
            self.v_cache[li][rows, :, :T] = v
            g = H // Hk
            o = F.scaled_dot_product_attention(q, k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1),
                                               is_causal=True)
            x = x + lin(o.transpose(1, 2).reshape(n * T, H * D), w_o, li, 1)
            h = self.kernels.rms(x, w_post, self.eps)
            x = x + lin(self.kernels.swiglu(lin(h, w_gu, li, 2)), w_down, li, 3)
        last = x.view(n, T, self.hidden)[torch.arange(n, device=ids.device), lengths - 1]
        logits = F.linear(rms(last, self.w.norm, self.eps), self.w.lm_head).float()
        if keep_hidden:
            return logits, rms(x, self.w.norm, self.eps).view(n, T, self.hidden)
        return logits

    def logits_of(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits of final-normed hidden states (prefill_forward's keep_hidden output)."""
        return F.linear(hidden, self.w.lm_head).float()

    # ------------------------------------------------------------ decode

    def _layers(self, b: int, lb: int, lora: bool):
        """Embed rows [0, b)'s inputs and run every decode layer over cache positions [0, lb) (K/V written at
        pos); lora: each row adds its adapter's delta (the eager layer). Returns (x, d, pos)."""
        D = self.head_dim
        tok, pos = self.tok_buf[:b], self.pos_buf[:b]
        x, d = F.embedding(tok, self.w.embed), self._zeros[:b]
        cos, sin = self.cos[pos].view(b, 1, D), self.sin[pos].view(b, 1, D)
        mask = (self.arange_len[:lb].view(1, lb) <= pos.view(b, 1)).view(b, 1, 1, lb)
        if self.kernels.layer_compiled and not lora:
            mark_bucket_dynamic(mask)
        args = (cos, sin, mask, self.rows[:b], self.heads, pos)
        layer = self.kernels.lora_layer if lora else self.kernels.for_batch(b)[0]
        for li, ws in enumerate(self.w.layers):
            extra = (self.slot_buf[:b], self.lora.tensors[li]) if lora else ()
            x, d = layer(x, d, *args, self.k_cache[li], self.v_cache[li], *ws, *extra)
        return x, d, pos

    def step_core(self, b: int, lb: int, sampling: bool, lora: bool = False) -> torch.Tensor:
        """One decode step for rows [0, b) attending over cache positions [0, lb). Writes K/V at pos."""
        x, d, pos = self._layers(b, lb, lora)
        head = self.kernels.for_batch(b)[1]
        return head(x, d, self.w.norm, self.w.lm_head, self.temp_buf[:b], self.top_p_buf[:b],
                    self.seed_buf[:b], pos, sampling)

    def step_logits(self, b: int, lb: int, lora: bool = False) -> torch.Tensor:
        """One eager decode step for rows [0, b) that returns its fp32 logits [b, V] instead of choosing a token:
        the host masks them (grammars), reads their log-probabilities, then calls advance()."""
        x, d, _ = self._layers(b, lb, lora)
        return F.linear(self.kernels.rms(x + d, self.w.norm, self.eps), self.w.lm_head).float()

    def advance(self, b: int, tokens: torch.Tensor) -> None:
        """After step_logits: the chosen tokens become rows [0, b)'s next inputs, one position on."""
        self.tok_buf[:b].copy_(tokens)
        self.pos_buf[:b].add_(1).clamp_(max=self.max_len - 1)

    def step(self, b: int, lb: int, sampling: bool, lora: bool = False) -> None:
        """step_core, then the next input and position written back into the decode state."""
        nxt = self.step_core(b, lb, sampling, lora)
        self.tok_buf[:b].copy_(nxt)
        self.pos_buf[:b].add_(1).clamp_(max=self.max_len - 1)

    def decode(self, b: int, lb: int, sampling: bool, lora: bool = False):
        """Launch `chunk` decode steps for rows [0, b) without waiting for them.

        Returns (host, event): the pinned [chunk + 1, max_batch] token history (row 0: the inputs), complete
        once `event` (None on CPU) has fired."""
        self.hist[0, :b].copy_(self.tok_buf[:b])
        g = self.graphs.decode_graph(b, lb, sampling, lora)
        for j in range(1, self.chunk + 1):
            if g is not None:
                g.replay()
            else:
                self.step(b, lb, sampling, lora)
            self.hist[j, :b].copy_(self.tok_buf[:b])
        host = self.hist_host[self._host_i]
        self._host_i ^= 1
        host[:, :b].copy_(self.hist[:, :b], non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        return host, event

    def add_adapter(self, name: str, adapter) -> None:
        """Put an adapter (lora.read_adapter's output) into the table, made on first use."""
        if self.lora is None:
            inter = self.w.layers[0][4].shape[0] // 2
            H, Hk, D, hidden = self.n_heads, self.n_kv, self.head_dim, self.hidden
            shapes = [[(hidden, (H + 2 * Hk) * D), (H * D, hidden), (hidden, 2 * inter), (inter, hidden)]
                      for _ in self.w.layers]
            self.lora = LoraTable(self.device, self.dtype, shapes)
        self.lora.add(name, adapter)

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy a request's decode state and its first `length` cache positions from row src to row dst."""
        for buf in (self.tok_buf, self.pos_buf, self.temp_buf, self.top_p_buf, self.seed_buf, self.slot_buf):
            buf[dst] = buf[src]
        self.k_cache[:, dst, :, :length] = self.k_cache[:, src, :, :length]
        self.v_cache[:, dst, :, :length] = self.v_cache[:, src, :, :length]
