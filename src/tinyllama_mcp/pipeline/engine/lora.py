"""Several LoRA adapters of one base served in one batch: each row adds its own adapter's low-rank delta.

The table holds, per layer and per fused projection (QKV, O, gate|up, down), every adapter's A and B stacked
[slots, rank, in] and [slots, out, rank], slot 0 being "no adapter" (zeros). The scale alpha/r is folded into
B, ranks are padded to the largest with zeros, and a projection an adapter does not target stays zero. A row's
delta is (h @ A[i].T) @ B[i].T with i its adapter's slot, so no request's adapter or scale touches another's.
"""

from __future__ import annotations

from typing import Optional

import torch

GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def lora_delta(h: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Each row's adapter delta. h [n, in] or [n, T, in]; a [S, r, in]; b [S, out, r]; slots [n]."""
    x = h if h.dim() == 3 else h.unsqueeze(1)
    y = torch.bmm(torch.bmm(x, a[slots].transpose(1, 2)), b[slots].transpose(1, 2))
    return y if h.dim() == 3 else y.squeeze(1)


def _module_lora(module, name: str):
    """(A [r, in], B [out, r] * scale) of adapter `name` on one PEFT LoRA layer; None where it has none."""
    if not hasattr(module, "lora_A") or name not in module.lora_A:
        return None
    if getattr(module, "use_dora", {}).get(name, False) or getattr(module, "lora_bias", {}).get(name, False):
        from tinyllama_mcp.pipeline.engine.weights import EngineUnsupported

        raise EngineUnsupported("DoRA adapters and LoRA biases are not supported by the engine")
    a, b = module.lora_A[name].weight.float(), module.lora_B[name].weight.float()
    if getattr(module, "fan_in_fan_out", False):
        a, b = b.T, a.T
    return a, b * module.scaling[name]


def read_adapter(model, name: str) -> list[list[Optional[tuple[torch.Tensor, torch.Tensor]]]]:
    """Adapter `name` of a PEFT model as [layer][group] -> (A, B) of the fused projection, None where untargeted."""
    from tinyllama_mcp.pipeline.nn.llama import causal_lm_of

    layers = []
    for layer in causal_lm_of(model).model.layers:
        modules = {**{p: getattr(layer.self_attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
                   **{p: getattr(layer.mlp, p) for p in ("gate_proj", "up_proj", "down_proj")}}
        groups = []
        for group in GROUPS:
            parts = [_module_lora(modules[p], name) for p in group]
            if all(part is None for part in parts):
                groups.append(None)
                continue
            outs = [modules[p].base_layer.weight.shape[0] if hasattr(modules[p], "base_layer")
                    else modules[p].weight.shape[0] for p in group]
            ins = modules[group[0]].base_layer.weight.shape[1]
            rank = sum(part[0].shape[0] for part in parts if part is not None)
            a = torch.zeros(rank, ins)
            b = torch.zeros(sum(outs), rank)
            r0, o0 = 0, 0
            for part, out in zip(parts, outs):
                if part is not None:  # block-diagonal: each projection's rows of B read only its own A rows
                    r = part[0].shape[0]
                    a[r0:r0 + r] = part[0].cpu()
                    b[o0:o0 + out, r0:r0 + r] = part[1].cpu()
                    r0 += r
                o0 += out
            groups.append((a, b))
        layers.append(groups)
    return layers


class LoraTable:
    """Every loaded adapter's A and B, by slot. Grown (reallocated) when an adapter needs more rank or room."""

    def __init__(self, device: torch.device, dtype: torch.dtype, shapes: list[list[tuple[int, int]]]):
        """shapes[layer][group]: (in, out) of each fused projection."""
        self.device, self.dtype, self.shapes = device, dtype, shapes
        self.names: list[str] = []
        self.rank, self.capacity = 0, 0
        self.tensors: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        self.version = 0  # bumped on reallocation: graphs captured over the old tensors are stale

    def slot(self, name: Optional[str]) -> int:
        return 0 if name is None else self.names.index(name) + 1

    def _grow(self, rank: int, capacity: int) -> None:
        fresh = [[(torch.zeros(capacity + 1, rank, i, device=self.device, dtype=self.dtype),
                   torch.zeros(capacity + 1, o, rank, device=self.device, dtype=self.dtype))
                  for i, o in layer] for layer in self.shapes]
        for old_layer, new_layer in zip(self.tensors, fresh):
            for (oa, ob), (na, nb) in zip(old_layer, new_layer):
                na[: oa.shape[0], : oa.shape[1]] = oa
                nb[: ob.shape[0], :, : ob.shape[2]] = ob
        self.tensors, self.rank, self.capacity = fresh, rank, capacity
        self.version += 1

    def add(self, name: str, adapter) -> int:
        """Put adapter `name` (read_adapter's output) into a slot; returns the slot."""
        if name in self.names:
            return self.slot(name)
        rank = max([g[0].shape[0] for layer in adapter for g in layer if g is not None] + [1])
        if rank > self.rank or len(self.names) >= self.capacity:
            self._grow(max(rank, self.rank), max(4, 2 * self.capacity) if len(self.names) >= self.capacity
                       else self.capacity)
        self.names.append(name)
        s = len(self.names)
        for layer, tensors in zip(adapter, self.tensors):
            for group, (ta, tb) in zip(layer, tensors):
                if group is not None:
                    a, b = group
                    ta[s, : a.shape[0]] = a.to(self.device, self.dtype)
                    tb[s, :, : b.shape[1]] = b.to(self.device, self.dtype)
        return s
