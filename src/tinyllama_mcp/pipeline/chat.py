"""TinyLlama's chat format, in one place, for training and serving alike.

Each turn is `<|role|>\\n{content}</s>\\n`; a generation prompt ends with `<|assistant|>\\n`.
This is the template of TinyLlama-1.1B-Chat-v1.0 without its stray whitespace, with
`{% generation %}` markers so TRL can mask non-assistant tokens when asked to.

Tools (OpenAI's function calling): with `tools`, the system turn (made if there is none) ends with TOOLS_PREAMBLE,
the tools as JSON and TOOLS_HOWTO; an assistant turn with `tool_calls` holds its calls as pipeline.tool_format
blocks, inside the generation markers (they are trained on); tool results are `<|tool|>` turns. Rows without
tools render exactly as before.
"""

from __future__ import annotations

from typing import Any, Optional

from tinyllama_mcp.pipeline.tool_format import TOOL_CALL_END, TOOL_CALL_START, dumps, render_tool_calls

TOOLS_PREAMBLE = "# Tools\n\nYou may call one or more of these functions. Their signatures:\n<tools>"
TOOLS_HOWTO = (
    "\n</tools>\n\nTo call functions, answer with one block per call, nothing else:\n"
    f'{TOOL_CALL_START}\n{{"name": <function name>, "arguments": <arguments as a JSON object>}}\n{TOOL_CALL_END}'
)


def _jinja(text: str) -> str:
    """A Python string as a Jinja string literal (the template's constants)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


_TOOLS_BLOCK = (
    "{{ " + _jinja(TOOLS_PREAMBLE) + " }}"
    "{% for tool in tools %}{{ '\\n' + (tool | tojson) }}{% endfor %}"
    "{{ " + _jinja(TOOLS_HOWTO) + " }}"
)
_TOOL_CALLS = (
    "{% if message['content'] %}{{ message['content'] + '\\n' }}{% endif %}"
    "{% for call in message['tool_calls'] %}"
    "{% set f = call['function'] if call['function'] is defined else call %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ " + _jinja(TOOL_CALL_START + '\n{"name": ') + " + (f['name'] | tojson) + ', \"arguments\": ' }}"
    "{% if f['arguments'] is string %}{{ f['arguments'] }}{% else %}{{ f['arguments'] | tojson }}{% endif %}"
    "{{ " + _jinja("}\n" + TOOL_CALL_END) + " }}"
    "{% endfor %}"
)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and tools and message['role'] != 'system' %}"
    "{{ '<|system|>\n' }}" + _TOOLS_BLOCK + "{{ eos_token + '\n' }}"
    "{% endif %}"
    "{% if loop.first and tools and message['role'] == 'system' %}"
    "{{ '<|system|>\n' }}{% if message['content'] %}{{ message['content'] + '\n\n' }}{% endif %}"
    + _TOOLS_BLOCK + "{{ eos_token + '\n' }}"
    "{% elif message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] %}"
    "{{ '<|assistant|>\n' }}{% generation %}" + _TOOL_CALLS + "{{ eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

ROLE_TAGS = ("<|system|>", "<|user|>", "<|assistant|>")  # tiny-demo's special tokens (its tokenizer is built on them)
EOS = "</s>"


def tools_block(tools: list[Any]) -> str:
    """What the system turn ends with when tools are given."""
    return TOOLS_PREAMBLE + "".join("\n" + dumps(tool) for tool in tools) + TOOLS_HOWTO


def assistant_text(message: dict) -> str:
    """An assistant turn's text without EOS: its content, or its content and tool-call blocks."""
    calls = message.get("tool_calls")
    return render_tool_calls(message.get("content"), calls) if calls else message["content"]


def render(messages: list[dict], add_generation_prompt: bool, eos: str = EOS,
           tools: Optional[list[Any]] = None) -> str:
    """Render messages exactly as CHAT_TEMPLATE does, without a tokenizer (for preflight and DPO prompts)."""
    parts = []
    for i, m in enumerate(messages):
        if i == 0 and tools:
            system = m["content"] if m["role"] == "system" else ""
            parts.append(f"<|system|>\n{system + chr(10) * 2 if system else ''}{tools_block(tools)}{eos}\n")
            if m["role"] == "system":
                continue
        if m["role"] == "assistant":
            parts.append(f"<|assistant|>\n{assistant_text(m)}{eos}\n")
        else:
            parts.append(f"<|{m['role']}|>\n{m['content']}{eos}\n")
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)
