"""An Ollama Modelfile for an exported GGUF model: FROM the file, our chat format as a Go TEMPLATE, stop tokens.

The template renders each message as `<|role|>\\n{content}{eos}\\n` and ends with `<|assistant|>\\n`, as
pipeline.chat's template does for chats without tools (Ollama passes tools its own way). The check renders it with
the small Go-template interpreter below and compares with our template on fixed chats.
"""

from __future__ import annotations

import re
from pathlib import Path

from tinyllama_mcp.pipeline.chat import ROLE_TAGS
from tinyllama_mcp.pipeline.export import checks
from tinyllama_mcp.pipeline.export.source import CHATS, Source

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def template(eos: str) -> str:
    return "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}" + eos + "\n{{ end }}<|assistant|>\n"


def stops(eos: str) -> list[str]:
    return [eos, *ROLE_TAGS]


def write_modelfile(path: Path, gguf_file: str, eos: str) -> None:
    lines = [f"FROM ./{gguf_file}", f'TEMPLATE """{template(eos)}"""']
    lines += [f'PARAMETER stop "{stop}"' for stop in stops(eos)]
    path.write_text("\n".join(lines) + "\n", "utf-8")


def parse_modelfile(text: str) -> dict:
    """FROM, TEMPLATE and the stop PARAMETERs of a Modelfile (the instructions this export writes)."""
    found = {"from": None, "template": None, "stops": []}
    body = re.sub(r'TEMPLATE """(.*?)"""', lambda m: found.__setitem__("template", m.group(1)) or "", text, flags=re.S)
    for line in body.splitlines():
        if line.startswith("FROM "):
            found["from"] = line[5:].strip()
        elif m := re.fullmatch(r'PARAMETER stop "(.*)"', line.strip()):
            found["stops"].append(m.group(1))
    return found


def render_go(source: str, messages: list[dict]) -> str:
    """Render the Go-template subset written here: text, {{ .Role }}, {{ .Content }}, {{ range .Messages }} ...
    {{ end }}, with {{- and -}} trimming whitespace; anything else raises ValueError."""
    parts, pos = [], 0
    for m in _ACTION.finditer(source):
        parts += [("text", source[pos:m.start()]), ("action", m.group(2), m.group(1) == "-", m.group(3) == "-")]
        pos = m.end()
    parts.append(("text", source[pos:]))
    for i, part in enumerate(parts):  # trim markers act on the neighbouring text
        if part[0] == "action" and part[2] and i > 0:
            parts[i - 1] = ("text", parts[i - 1][1].rstrip())
        if part[0] == "action" and part[3] and i + 1 < len(parts):
            parts[i + 1] = ("text", parts[i + 1][1].lstrip())

    def run(items: list, scope: dict) -> str:
        out, i = [], 0
        while i < len(items):
            item = items[i]
            if item[0] == "text":
                out.append(item[1])
            elif item[1] == "range .Messages":
                depth, j = 1, i + 1
                while depth:
                    depth += items[j][0] == "action" and items[j][1].startswith("range ")
                    depth -= items[j][0] == "action" and items[j][1] == "end"
                    j += 1
                out += [run(items[i + 1:j - 1], {"Role": msg["role"], "Content": msg["content"]}) for msg in messages]
                i = j - 1
            elif item[1] in (".Role", ".Content") and item[1][1:] in scope:
                out.append(scope[item[1][1:]])
            else:
                raise ValueError(f"{{{{ {item[1]} }}}} is outside the Go-template subset this check renders")
            i += 1
        return "".join(out)

    return run(parts, {})


def verify_modelfile(path: Path, source: Source, gguf_names: set[str]) -> dict:
    file = path.name
    try:
        found = parse_modelfile(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        checks.require(False, file, f"it cannot be read ({exc})")
    target = (found["from"] or "").removeprefix("./")
    checks.require(target in gguf_names, file, f"FROM {found['from']!r} is not a verified GGUF model of this export")
    eos = source.tokenizer.eos_token
    checks.require(eos in found["stops"], file, f"its stop parameters {found['stops']} lack EOS {eos!r}")
    checks.require(found["template"] is not None, file, "it has no TEMPLATE")
    for chat in CHATS:
        want = source.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        try:
            got = render_go(found["template"], chat)
        except (ValueError, IndexError) as exc:
            checks.require(False, file, f"its TEMPLATE does not render: {exc}")
        checks.require(got == want, file, f"its TEMPLATE renders {got[:60]!r} where the source renders {want[:60]!r}")
    return {"method": "Modelfile parsed; FROM names a verified GGUF model of this export; TEMPLATE rendered by a "
                      "Go-template subset interpreter and compared with the source's chat template; EOS among the "
                      "stops",
            "max_abs_logit_diff": None, "bound": None, "passed": True, "from": target,
            "chats_rendered_equal": len(CHATS), "stops": found["stops"]}
