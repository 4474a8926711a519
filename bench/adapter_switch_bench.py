"""The adapter switch of DPO's reference pass: peft's `disable_adapter()` against speed.adapter_switch.quick_adapter_switch.

    python -m bench.adapter_switch_bench [--switches 20]

TRL enters `model.disable_adapter()` once per DPO step for the reference pass. Its cost is Python over the module
tree, so it depends on the model's structure, not its size or the device: the model here has TinyLlama's structure
(22 decoder layers, LoRA r64 on the 7 projections: 154 adapter layers, ~1,000 modules) at a small hidden size, on
the CPU. Both switches run in the same process over the same model; prints one JSON line with ms per switch (enter
and exit) and the ratio, and the CPU it ran on.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--switches", type=int, default=20)
    args = ap.parse_args(argv)
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.synthetic import TINYLLAMA_SHAPE
    from tinyllama_mcp.pipeline.speed.adapter_switch import quick_adapter_switch
    from tinyllama_mcp.pipeline.specs import LLAMA_PROJECTIONS

    shape = dict(TINYLLAMA_SHAPE, hidden_size=256, intermediate_size=704, num_attention_heads=4,
                 num_key_value_heads=1, vocab_size=1024)  # TinyLlama's structure, small tensors
    model = get_peft_model(LlamaForCausalLM(LlamaConfig(**shape)),
                           LoraConfig(r=64, lora_alpha=32, target_modules=list(LLAMA_PROJECTIONS)))

    def per_switch_ms() -> float:
        t0 = time.perf_counter()
        for _ in range(args.switches):
            with model.disable_adapter():
                pass
        return (time.perf_counter() - t0) * 1000 / args.switches

    per_switch_ms()  # warm-up
    peft_ms = per_switch_ms()
    quick_adapter_switch(model)
    per_switch_ms()
    quick_ms = per_switch_ms()
    adapter_layers = sum(1 for m in model.modules() if hasattr(m, "lora_A"))
    print(json.dumps({"cpu": cpu_name(), "torch": torch.__version__, "adapter_layers": adapter_layers,
                      "modules": sum(1 for _ in model.modules()), "switches": args.switches,
                      "peft_ms_per_switch": round(peft_ms, 2), "quick_ms_per_switch": round(quick_ms, 2),
                      "ratio": round(peft_ms / quick_ms, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
