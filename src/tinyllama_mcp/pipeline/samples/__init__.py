"""Small sample datasets written for this project (a team's engineering conventions as Q&A).

They let the embedded `tiny-demo` model learn something visible in seconds on a CPU.
"""

from pathlib import Path

_HERE = Path(__file__).resolve().parent

SFT_SAMPLE = _HERE / "sft_sample.jsonl"  # chat `messages` rows (UltraChat layout)
DPO_SAMPLE = _HERE / "dpo_sample.jsonl"  # system/input/chosen/rejected (distilabel Orca pairs layout)
DPO_SAMPLE_PAIRS = _HERE / "dpo_sample_pairs.jsonl"  # prompt/chosen/rejected
# OpenAI's fine-tuning format for function calling: `tools` plus assistant `tool_calls` and `tool` results.
# Not part of tiny-demo's tokenizer corpus (that would change tiny-demo).
SFT_TOOLS_SAMPLE = _HERE / "sft_tools_sample.jsonl"

# Hyperparameters for the tiny random-init demo model, as start_sft/start_dpo arguments. The reference
# recipe's learning rates are tuned for a pretrained 1.1B model; a 0.5M-parameter model from random
# weights needs a much larger step and several passes over 32 rows to learn visibly in seconds.
DEMO_SFT_OVERRIDES = {
    "learning_rate": 1e-2,
    "num_train_epochs": 20,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "max_length": 128,
}
DEMO_DPO_OVERRIDES = {
    "learning_rate": 2e-3,
    "max_steps": 24,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "max_length": 128,
}
