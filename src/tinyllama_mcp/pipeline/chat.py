"""TinyLlama's chat format, in one place.

Each turn is `<|role|>\\n{content}</s>\\n`; a generation prompt ends with `<|assistant|>\\n`.
This is the template of TinyLlama-1.1B-Chat-v1.0 without its stray whitespace, with
`{% generation %}` markers so TRL can mask non-assistant tokens when asked to.
"""

from __future__ import annotations

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

ROLE_TAGS = ("<|system|>", "<|user|>", "<|assistant|>")
EOS = "</s>"


def render(messages: list[dict], add_generation_prompt: bool, eos: str = EOS) -> str:
    """Render messages exactly as CHAT_TEMPLATE does, without a tokenizer (for preflight and DPO prompts)."""
    parts = []
    for m in messages:
        parts.append(f"<|{m['role']}|>\n{m['content']}{eos}\n")
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)
