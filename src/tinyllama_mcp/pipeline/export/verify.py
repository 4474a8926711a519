"""Writing each format and checking it, and verify_export: a finished export checked again, file by file.

Every check reads the file back with a reader other than the writer and compares it with the source model on fixed
prompts (source.py): GGUF through gguf.GGUFReader with our own dequantization and a llama.cpp-style forward pass
(gguf_model, gguf_lora), PEFT through peft, safetensors through transformers, the Modelfile through a Go-template
interpreter. A llama.cpp build is not part of the check: llama-cpp-python ships only as a source distribution that
takes minutes to compile, so the independent GGUFReader path is the check, here and in CI.
"""

from __future__ import annotations

from pathlib import Path

from tinyllama_mcp.errors import SelfCheckError
from tinyllama_mcp.pipeline.export import gguf_lora, gguf_model, modelfile, peft_format, safetensors_format
from tinyllama_mcp.pipeline.export.manifest import read_manifest, unchanged
from tinyllama_mcp.pipeline.export.source import Source, load_source
from tinyllama_mcp.pipeline.specs import EXPORT_FORMATS

GGUF_KIND = {"gguf-f16": "f16", "gguf-bf16": "bf16", "gguf-q8_0": "q8_0"}
OLLAMA_FROM = ("gguf-f16", "gguf-q8_0", "gguf-bf16")  # the Modelfile's FROM: the first of these exported


def relative_path(fmt: str, stem: str) -> str:
    if fmt in GGUF_KIND:
        return f"{stem}-{GGUF_KIND[fmt]}.gguf"
    return {"gguf-lora": f"{stem}-lora.gguf", "ollama": "Modelfile", "peft": "peft", "safetensors": "safetensors"}[fmt]


def write(fmt: str, root: Path, relative: str, source: Source, name: str, done: list[dict]) -> dict:
    """Write one format under root; returns what the manifest entry adds (besides the file facts)."""
    path = root / relative
    if fmt in GGUF_KIND:
        gguf_model.write_model(path, source, GGUF_KIND[fmt], name)
        return {"quantization": GGUF_KIND[fmt]}
    if fmt == "gguf-lora":
        gguf_lora.write_lora(path, source, name)
        return {"applies_to": applies_to(source)}
    if fmt == "ollama":
        target = next(f["path"] for fmt_ in OLLAMA_FROM for f in done if f["format"] == fmt_)
        modelfile.write_modelfile(path, target, source.tokenizer.eos_token)
        return {"from": target}
    if fmt == "peft":
        return {**peft_format.write_peft(path, source), "applies_to": applies_to(source)}
    return {"dtype": safetensors_format.write_safetensors(path, source)}


def check(fmt: str, path: Path, source: Source, done: list[dict]) -> dict:
    """Read one written format back and compare it with the source; SelfCheckError names file, figure and bound."""
    if not path.exists():
        raise SelfCheckError(f"{path.name} is missing from the export folder; export again")
    if fmt in GGUF_KIND:
        return gguf_model.verify_model(path, source, GGUF_KIND[fmt])
    if fmt == "gguf-lora":
        return gguf_lora.verify_lora(path, source)
    if fmt == "ollama":
        return modelfile.verify_modelfile(path, source, {f["path"] for f in done if f["format"] in GGUF_KIND})
    if fmt == "peft":
        return peft_format.verify_peft(path, source)
    return safetensors_format.verify_safetensors(path, source)


def applies_to(source: Source) -> dict:
    """What an adapter file must be applied to: the stack's base, with the earlier adapters merged in first."""
    stack = source.stack or {}
    return {"base_model": stack.get("base_model"), "adapters_merged_first": stack.get("adapters", [])[:-1],
            "base_quantization_in_training": (stack.get("quant") or {}).get("quantization")}


def verify_export(path: str | Path) -> dict:
    """Check a finished export folder (or its manifest.json) again: each file against the source model it names, then
    its size and sha256 against the manifest. Returns {relative path: verification}; SelfCheckError on the first
    file that fails, naming it with the figure and the bound."""
    root = Path(path)
    root = root.parent if root.name == "manifest.json" else root
    manifest = read_manifest(root)
    source = load_source(manifest["source"])
    results: dict[str, dict] = {}
    done: list[dict] = []
    for recorded in sorted(manifest["files"], key=lambda f: EXPORT_FORMATS.index(f["format"])):
        results[recorded["path"]] = check(recorded["format"], root / recorded["path"], source, done)
        unchanged(root, recorded)
        done.append(recorded)
    return results
