"""CUDA graphs of the runner's steps, captured on first use and replayed.

- Decode: one graph per (padded batch size, context bucket, greedy|sampling). The running batch is padded up
  to the next captured size (1, 2, 4, 8, then steps of 8) and attention reads only the first `bucket`
  positions of the cache (256, 512, 1024, ...). At batch 1, where the compiled GEMV variant exists, both it
  and the cuBLAS variant are captured once and timed; the faster is kept.
- Prefill of a lone request: one graph per prompt-length bucket (16, 32, 64, ...), since eagerly its few
  dozen launches a layer take longer than its GPU work. Right-padded: causal attention keeps the pads out of
  the real tokens, and decode overwrites the pads' K/V before attending to them.
A failed capture falls back (GEMV -> cuBLAS, compiled layer -> helpers, graphs -> eager) and says so in
EngineInfo.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import NamedTuple, Optional

import torch

from tinyllama_mcp.pipeline.engine.info import (
    BATCH1_GEMV, CAPTURE_LAYER, CUDA_GRAPHS, PREFILL_GRAPH, Batch1Gemv, EngineInfo,
)
from tinyllama_mcp.pipeline.engine.kernels import DecodeKernels

log = logging.getLogger(__name__)

_FATAL = "nothing: the engine thread fails its requests"


class PrefillGraph(NamedTuple):
    graph: torch.cuda.CUDAGraph
    ids: torch.Tensor  # [1, bucket] the static inputs the graph reads
    length: torch.Tensor  # [1]
    row: torch.Tensor  # [1]
    logits: torch.Tensor  # [1, V] the static output it writes


class CudaGraphs:
    def __init__(self, runner, kernels: DecodeKernels, info: EngineInfo):
        """runner: the ModelRunner whose steps are captured (its decode state, cache and forward functions)."""
        self.runner, self.kernels, self.info = runner, kernels, info
        S, M = runner.max_batch, runner.max_len
        self.capture_sizes = sorted({s for s in (1, 2, 4, 8, *range(16, S + 1, 8)) if s <= S} | {S})
        self.buckets = sorted({b for b in (256 * 2**i for i in range(16)) if b < M} | {M})
        self.prefill_buckets = [b for b in (16 * 2**i for i in range(16)) if b < M] + [M]
        self.decode: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.prefill: dict[int, PrefillGraph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.enabled else None

    @property
    def enabled(self) -> bool:
        return self.info.cuda_graphs

    def pad_batch(self, n: int) -> int:
        return next(s for s in self.capture_sizes if s >= n) if self.enabled else n

    def bucket(self, need: int) -> int:
        need = min(need, self.runner.max_len)
        return next(b for b in self.buckets if b >= need) if self.enabled else need

    def warmup(self, batch_sizes, buckets, sampling) -> None:
        """Capture the decode graphs of these batch sizes (padded), buckets and sampling modes now."""
        for b in batch_sizes or self.capture_sizes:
            for lb in buckets or self.buckets:
                for smp in sampling:
                    self.decode_graph(self.pad_batch(b), lb, smp)
                    if not self.enabled:
                        return

    def _capture(self, warm, body):
        """Run `warm` twice on a side stream (compiles and allocates outside the capture), then capture `body`."""
        dev = self.runner.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):
                warm()
        torch.cuda.current_stream(dev).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(g, pool=self._pool, capture_error_mode="thread_local"):
            out = body()
        return g, out

    # ------------------------------------------------------------ decode

    def _capture_decode(self, b: int, lb: int, sampling: bool, lora: bool = False):
        r = self.runner
        # the warm-up steps are idempotent: they rewrite the same K/V at the same positions
        return self._capture(lambda: r.step_core(b, lb, sampling, lora), lambda: r.step(b, lb, sampling, lora))[0]

    def decode_graph(self, b: int, lb: int, sampling: bool, lora: bool = False) -> Optional[torch.cuda.CUDAGraph]:
        """The graph of this decode step, captured if new; None where graphs are off (decode eagerly).
        lora: rows add their adapters' deltas; keyed by the adapter table's version (its tensors)."""
        key = (b, lb, sampling, self.runner.lora.version if lora else 0)
        g = self.decode.get(key)
        if g is not None or not self.enabled:
            return g
        if lora:  # graphs over an older adapter table read tensors that are gone
            for stale in [k for k in self.decode if k[3] not in (0, key[3])]:
                del self.decode[stale]
            try:
                g = self.decode[key] = self._capture_decode(b, lb, sampling, lora=True)
                return g
            except Exception as exc:
                log.warning("engine: CUDA graph capture of an adapter batch failed, decoding eagerly: %r", exc)
                self.info.fell_back(CUDA_GRAPHS, "eager decode", repr(exc)[:500])
                self.info.cuda_graphs = False
                self.decode.clear()
                torch.cuda.synchronize(self.runner.device)
                return None
        k = self.kernels
        try:
            if b == 1 and k.b1_gemv is not None and k.b1_choice is None:
                g = self._choose_b1(lb, sampling)
            else:
                g = self._capture_decode(b, lb, sampling)
            self.decode[key] = g
            return g
        except Exception as exc:
            if b == 1 and k.b1_choice == "gemv":
                log.warning("engine: batch-1 GEMV graph failed for %s, using cuBLAS projections: %r", key, exc)
                k.b1_choice, k.b1_gemv = "mm", None
                self.info.batch1_gemv = dataclasses.replace(self.info.batch1_gemv or Batch1Gemv(), choice="mm")
                self.info.fell_back(BATCH1_GEMV, "cuBLAS projections", repr(exc)[:500])
                torch.cuda.synchronize(self.runner.device)
                return self.decode_graph(b, lb, sampling)
            if k.layer_compiled:
                # the compiled layer could not be captured (or recompiled at capture): try the helpers path
                log.warning("engine: CUDA graph capture with the compiled decode layer failed for %s, "
                            "falling back to the helpers path: %r", key, exc)
                now = "helpers" if self.info.compiled_helpers else "none"
                self.info.fell_back(CAPTURE_LAYER, now, repr(exc)[:791])
                self.decode.clear()
                try:
                    torch.cuda.synchronize(self.runner.device)
                except Exception as sync_exc:
                    self.info.fell_back(CUDA_GRAPHS, _FATAL, f"synchronize after a failed capture: {sync_exc!r}"[:500])
                    raise
                k.drop_compiled_layer()
                self._pool = torch.cuda.graph_pool_handle()
                return self.decode_graph(b, lb, sampling)
            log.warning("engine: CUDA graph capture failed for %s, decoding eagerly from now on: %r", key, exc)
            self.info.fell_back(CUDA_GRAPHS, "eager decode", repr(exc)[:500])
            self.info.cuda_graphs = False
            self.decode.clear()
            try:
                torch.cuda.synchronize(self.runner.device)
            except Exception as sync_exc:  # a sticky CUDA error: the engine thread will fail its requests
                self.info.fell_back(CUDA_GRAPHS, _FATAL, f"then synchronize failed: {sync_exc!r}"[:298])
                raise
            return None

    def _time(self, g, n: int = 30) -> float:
        """ms per replay. Replays advance row 0's token/position: saved and restored. The K/V they write lie
        past row 0's position, where decode overwrites them before attending to them."""
        r = self.runner
        saved = r.tok_buf[:1].clone(), r.pos_buf[:1].clone()
        g.replay()
        torch.cuda.synchronize(r.device)
        t0 = time.perf_counter()
        for _ in range(n):
            g.replay()
        torch.cuda.synchronize(r.device)
        ms = (time.perf_counter() - t0) * 1000 / n
        r.tok_buf[:1].copy_(saved[0])
        r.pos_buf[:1].copy_(saved[1])
        return ms

    def _choose_b1(self, lb: int, sampling: bool):
        """Capture batch 1 with cuBLAS projections and with GEMV reductions, time both, keep the faster."""
        k = self.kernels
        timing = Batch1Gemv(bucket=lb)
        k.b1_choice = "mm"
        g_mm = self._capture_decode(1, lb, sampling)
        timing.mm_step_ms = round(self._time(g_mm), 4)
        try:
            k.b1_choice = "gemv"
            g_gemv = self._capture_decode(1, lb, sampling)
            timing.gemv_step_ms = round(self._time(g_gemv), 4)
        except Exception as exc:
            log.warning("engine: batch-1 GEMV graph failed, using cuBLAS projections: %r", exc)
            self.info.fell_back(BATCH1_GEMV, "cuBLAS projections", repr(exc)[:500])
            torch.cuda.synchronize(self.runner.device)
            g_gemv = None
        if g_gemv is not None and timing.gemv_step_ms < timing.mm_step_ms:
            k.b1_choice, g = "gemv", g_gemv
        else:
            k.b1_choice, g, k.b1_gemv = "mm", g_mm, None
        timing.choice = k.b1_choice
        self.info.batch1_gemv = timing
        return g

    # ------------------------------------------------------------ batch-1 prefill

    def prefill_logits(self, prompt: list[int], slot: int, h2d) -> Optional[torch.Tensor]:
        """One prompt's prefill into `slot`, replayed from the graph of its length bucket; its last token's
        logits. None where no graph can run: the caller prefills eagerly. h2d(data, dtype): a device tensor."""
        T = len(prompt)
        bucket = next((b for b in self.prefill_buckets if b >= T), None)
        if bucket is None or self.info.failed(PREFILL_GRAPH):
            return None
        entry = self.prefill.get(bucket)
        if entry is None:
            try:
                entry = self.prefill[bucket] = self._capture_prefill(bucket, slot)
            except Exception as exc:
                log.warning("engine: capturing the batch-1 prefill failed, prefilling eagerly: %r", exc)
                self.info.fell_back(PREFILL_GRAPH, "eager prefill", repr(exc)[:500])
                torch.cuda.synchronize(self.runner.device)
                return None
        entry.ids.zero_()
        entry.ids[0, :T].copy_(h2d([prompt], torch.long)[0])
        entry.length.fill_(T)
        entry.row.fill_(slot)
        entry.graph.replay()
        return entry.logits

    def _capture_prefill(self, bucket: int, slot: int) -> PrefillGraph:
        """Capture at `slot`, the slot about to be prefilled: the warm-up runs write its cache rows, no other's."""
        r = self.runner
        ids = torch.zeros(1, bucket, dtype=torch.long, device=r.device)
        length = torch.full((1,), bucket, dtype=torch.long, device=r.device)
        row = torch.full((1,), slot, dtype=torch.long, device=r.device)
        forward = lambda: r.prefill_forward(ids, length, row)  # noqa: E731
        graph, logits = self._capture(forward, forward)
        return PrefillGraph(graph, ids, length, row, logits)
