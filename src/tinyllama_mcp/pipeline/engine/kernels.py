"""Which functions run the prefill and decode steps: the compile fallback chain that picks them.

  "layer":   each decode layer (add+RMSNorm, QKV, RoPE + K/V write, attention, O, add+RMSNorm, SwiGLU) and the
             head compiled whole by inductor (fullgraph), for the CUDA graphs to capture; attention as fp32
             reductions at batch 1 and SDPA above; at batch 1 also a variant with the projections as Triton
             reductions (GEMV), which the graphs keep if it times faster than cuBLAS;
  "helpers": eager layers calling compiled RMSNorm/RoPE/SiLU*mul (SDPA attention);
  "none":    all eager (CPU, tests).
Each compiled function is checked against its eager twin before use; what failed is recorded in EngineInfo.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import torch

from tinyllama_mcp.pipeline.engine.info import BATCH1_GEMV, COMPILE_HELPERS, COMPILE_LAYER, EngineInfo
from tinyllama_mcp.pipeline.engine.layers import make_decode_layer, make_head, silu_mul
from tinyllama_mcp.pipeline.engine.weights import LlamaWeights
from tinyllama_mcp.pipeline.nn import ops as llama_ops

log = logging.getLogger(__name__)


def compiled(fn):
    """torch.compile for the decode step. dynamic=None: the first shapes (batch 1, first bucket) compile static;
    when the bucket, then the batch size change, it recompiles once each with those dims symbolic.
    coordinate_descent_tuning (as gpt-fast) tunes the reductions' block sizes."""
    return torch.compile(fn, fullgraph=True, dynamic=None, options={"coordinate_descent_tuning": True})


def mark_bucket_dynamic(mask: torch.Tensor) -> torch.Tensor:
    """Hint that the cache bucket (mask's last dim) be compiled symbolic from the first call: one compile
    fewer per variant. Soft: where dynamo specialises the dim anyway, it just recompiles later."""
    try:
        import torch._dynamo

        torch._dynamo.maybe_mark_dynamic(mask, 3)
    except Exception:
        pass
    return mask


def check_close(refs, gots, what: str) -> None:
    for r, g in zip(refs, gots):
        err = (r.float() - g.float()).abs().max().item()
        tol = 0.05 * max(r.float().abs().max().item(), 1e-3) + 1e-3
        if not err <= tol:
            raise RuntimeError(f"{what} differs from eager: max abs err {err:.3g} > {tol:.3g}")


class DecodeKernels:
    """The layer/head functions of the decode step per batch size, and the RMSNorm/RoPE/SiLU*mul of prefill."""

    def __init__(self, weights: LlamaWeights, info: EngineInfo, attention: Optional[str]):
        self.w, self.info, self.attention = weights, info, attention  # attention: None = chosen per batch size
        self.rms, self.rope, self.swiglu = llama_ops.rms_norm, llama_ops.rope, silu_mul
        self.layer_b1 = None  # the compiled layer for batch 1 with cuBLAS projections, when it differs
        self.b1_gemv = None  # compiled (layer, head) with GEMV-as-reduction projections, for batch 1
        self.b1_choice: Optional[str] = None  # "gemv" or "mm", decided by timing the first batch-1 graph
        self.attn_one: Optional[str] = None  # batch-1 attention of the compiled layers
        self.use_eager_step()

    def _dims(self):
        w = self.w
        return w.n_heads, w.n_kv_heads, w.head_dim, w.eps

    def use_eager_step(self) -> None:
        """Uncompiled layers and head (calling the compiled helpers where those compiled)."""
        attn = self.attention or "sdpa"
        self.layer = make_decode_layer(*self._dims(), attn, self.rms, self.rope, self.swiglu)
        self.lora_layer = self.layer  # rows with adapters run this eager layer (their deltas differ per row)
        self.head = make_head(self.w.eps, self.rms)
        self.info.attention = attn

    @property
    def layer_compiled(self) -> bool:
        return self.info.compile_mode == "layer"

    def for_batch(self, b: int):
        """(layer, head) for a decode step of b rows."""
        if b == 1 and self.b1_choice == "gemv" and self.b1_gemv is not None:
            return self.b1_gemv
        if b == 1 and self.layer_b1 is not None:
            return self.layer_b1, self.head
        return self.layer, self.head

    def drop_compiled_layer(self) -> None:
        """After the compiled layer failed to capture: the helpers path where they compiled, else eager."""
        self.use_eager_step()
        self.b1_gemv, self.b1_choice, self.layer_b1 = None, None, None
        self.info.compile_mode = "helpers" if self.info.compiled_helpers else "none"

    def compile(self, mode: str, batch1_gemv: bool, probe, bucket: int) -> None:
        """Go as far down the chain as `mode` allows. probe: the ModelRunner, whose rope tables, index tensors,
        decode buffers and cache shape make the check inputs; bucket: the context length the checks attend over."""
        t0 = time.perf_counter()
        if mode in ("layer", "helpers"):
            self._compile_helpers(probe)  # prefill always uses the helpers; also the "helpers" decode path
            if self.info.compiled_helpers:
                self.use_eager_step()
                self.info.compile_mode = "helpers"
        if mode == "layer":
            check = self._compile_layer(probe, bucket)
            if check is not None and batch1_gemv:
                self._compile_b1_gemv(check)
        self.info.compile_s = round(time.perf_counter() - t0, 2)

    def _compile_helpers(self, probe) -> None:
        try:
            opts = dict(dynamic=True, fullgraph=True)
            rms, rope, swiglu = (torch.compile(f, **opts) for f in (llama_ops.rms_norm, llama_ops.rope, silu_mul))
            dev, dt, w = probe.device, probe.dtype, self.w
            with torch.inference_mode():  # as prefill and decode call them (grad mode is guarded)
                rms(torch.randn(3, w.hidden, device=dev, dtype=dt), w.norm, w.eps)
                qk = torch.randn(3, w.n_heads + w.n_kv_heads, w.head_dim, device=dev, dtype=dt)
                rope(qk, probe.cos[:3, None], probe.sin[:3, None])
                swiglu(torch.randn(3, w.layers[0][4].shape[0], device=dev, dtype=dt))
            self.rms, self.rope, self.swiglu = rms, rope, swiglu
            self.info.compiled_helpers = True
        except Exception as exc:  # compile is an optimisation only
            log.warning("engine: torch.compile of the fused helpers failed, running them eagerly: %r", exc)
            self.info.fell_back(COMPILE_HELPERS, "eager RMSNorm/RoPE/SiLU*mul", repr(exc)[:500])

    def _compile_layer(self, probe, bucket: int):
        """Compile the decode layer and head whole, checked against the eager functions on layer 0.

        Attention differs by batch size unless one is configured: "reduce" at batch 1, where SDPA's kernels
        leave most of the GPU idle, and SDPA above, where it is the faster one. Returns the check's inputs and
        outputs (for the GEMV variant's check), or None where it failed."""
        attn_one, attn_many = self.attention or "reduce", self.attention or "sdpa"
        w = self.w
        try:
            import torch._dynamo

            cfg = torch._dynamo.config
            for name, val in (("recompile_limit", 64), ("cache_size_limit", 64), ("accumulated_recompile_limit", 512)):
                if hasattr(cfg, name):
                    setattr(cfg, name, max(getattr(cfg, name), val))
            head = compiled(make_head(w.eps))
            layer_one, (x, d, args, ref, kc0, vc0) = self._checked_layer(probe, bucket, attn_one, 1)
            hp = dict(temp=probe.temp_buf[:1], top_p=probe.top_p_buf[:1], seed=probe.seed_buf[:1], pos=args[-1])
            with torch.inference_mode():
                t_ref = make_head(w.eps)(ref[0], ref[1], w.norm, w.lm_head, sampling=False, **hp)
                t_got = head(ref[0], ref[1], w.norm, w.lm_head, sampling=False, **hp)
            if t_ref.shape != t_got.shape:
                raise RuntimeError("compiled head returned a wrong shape")
            # Checked at batch 2, so batch 1 keeps its own specialised code.
            layer_many = layer_one if attn_many == attn_one else self._checked_layer(probe, bucket, attn_many, 2)[0]
            self.layer, self.layer_b1, self.head = layer_many, layer_one, head
            self.info.compile_mode = "layer"
            self.info.attention = attn_one if attn_one == attn_many else f"{attn_one} at batch 1, {attn_many} above"
            self.attn_one = attn_one
            return x, d, args, ref, hp, kc0, vc0
        except Exception as exc:
            log.warning("engine: compiling the decode layer failed, falling back to %s: %r",
                        self.info.compile_mode, exc)
            self.info.fell_back(COMPILE_LAYER, self.info.compile_mode, repr(exc)[:800])
            return None

    def _checked_layer(self, probe, bucket: int, attn: str, b: int):
        """A compiled decode layer, checked against its eager twin at batch b on layer 0's weights."""
        w = self.w
        eager_layer = make_decode_layer(*self._dims(), attn)
        layer = compiled(eager_layer)
        dev, dt, lb = probe.device, probe.dtype, bucket
        # Test inputs made as the decode step makes them (inference tensors or not), so that the code compiled
        # here is the code decode reuses (a dispatch-key mismatch would recompile).
        gen = torch.Generator(device=dev).manual_seed(0)
        pos = torch.full((b,), 5, device=dev, dtype=torch.long)
        with torch.inference_mode():
            x = torch.randn(b, w.hidden, device=dev, dtype=dt, generator=gen)
            d = torch.randn(b, w.hidden, device=dev, dtype=dt, generator=gen) * 0.1
            cos, sin = probe.cos[pos].view(b, 1, -1), probe.sin[pos].view(b, 1, -1)
            mask = (probe.arange_len[:lb].view(1, lb) <= pos.view(b, 1)).view(b, 1, 1, lb)
        # scratch caches: the real ones stay untouched
        kc = torch.randn(probe.k_cache.shape[1:], device=dev, dtype=dt, generator=gen)
        vc = torch.randn(probe.k_cache.shape[1:], device=dev, dtype=dt, generator=gen)
        kc0, vc0 = kc.clone(), vc.clone()
        kc2, vc2 = kc.clone(), vc.clone()
        args = (cos, sin, mark_bucket_dynamic(mask), probe.rows[:b], probe.heads, pos)
        with torch.inference_mode():
            ref = eager_layer(x, d, *args, kc, vc, *w.layers[0])
            got = layer(x, d, *args, kc2, vc2, *w.layers[0])
        check_close(ref + (kc, vc), got + (kc2, vc2), f"compiled decode layer ({attn}, batch {b})")
        return layer, (x, d, args, ref, kc0, vc0)

    def _compile_b1_gemv(self, check) -> None:
        """The batch-1 variant whose projections are Triton reductions; the graphs time it against cuBLAS."""
        w = self.w
        try:
            x, d, args, ref, hp, kc, vc = check
            layer = compiled(make_decode_layer(*self._dims(), self.attn_one, use_gemv=True))
            head = compiled(make_head(w.eps, use_gemv=True))
            with torch.inference_mode():
                got = layer(x, d, *args, kc, vc, *w.layers[0])
                check_close(ref, got, "compiled batch-1 GEMV decode layer")
                t_ref = self.head(ref[0], ref[1], w.norm, w.lm_head, sampling=False, **hp)
                t_got = head(ref[0], ref[1], w.norm, w.lm_head, sampling=False, **hp)
                if t_ref.shape != t_got.shape:
                    raise RuntimeError("compiled batch-1 GEMV head returned a wrong shape")
            self.b1_gemv = (layer, head)
        except Exception as exc:
            log.warning("engine: compiling the batch-1 GEMV decode layer failed (cuBLAS projections it is): %r", exc)
            self.info.fell_back(BATCH1_GEMV, "cuBLAS projections", repr(exc)[:500])
