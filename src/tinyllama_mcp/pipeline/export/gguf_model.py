"""A whole model as one GGUF file for llama.cpp and Ollama (f16, bf16 or q8_0), written and verified.

Written with gguf.GGUFWriter: architecture "llama", the shape keys, the tokenizer and chat template, each tensor
under llama.cpp's name with Q/K rows permuted (llama_layout). As llama.cpp's converter does, 1-D tensors (the norms)
stay f32, and a q8_0 file keeps in f16 a matrix whose rows are not a multiple of 32 wide.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from tinyllama_mcp.pipeline.export import checks, ggml_forward
from tinyllama_mcp.pipeline.export.gguf_read import fields_of, open_gguf, tensor_types, tensors_of
from tinyllama_mcp.pipeline.export.gguf_tokenize import encoder_of
from tinyllama_mcp.pipeline.export.gguf_vocab import read_vocab, vocab_of, write_vocab
from tinyllama_mcp.pipeline.export.llama_layout import ARCH, LlamaShape, tensor_map, to_ggml_rows, to_hf_rows
from tinyllama_mcp.pipeline.export.source import CHATS, Source

Q = gguf.GGMLQuantizationType
KINDS = {"f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16), "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
         "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
TYPE_KIND = {Q.F32.name: "f32", Q.F16.name: "f16", Q.BF16.name: "bf16", Q.Q8_0.name: "q8_0"}


def stored_kind(kind: str, shape: tuple[int, ...]) -> str:
    """The type a tensor of this shape gets in a file of `kind`."""
    if len(shape) == 1:
        return "f32"
    if kind == "q8_0" and shape[-1] % 32:
        return "f16"
    return kind


def _encode(w: np.ndarray, kind: str) -> tuple[np.ndarray, Q]:
    qtype = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[kind]
    return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype), qtype


def write_model(path: Path, source: Source, kind: str, name: str) -> None:
    """The source's merged weights (adapter applied) as a GGUF model file of `kind` at `path`."""
    shape = LlamaShape.of_config(source.config)
    vocab = vocab_of(source.tokenizer, source.tokenizer_dir, shape.vocab)
    state = source.merged_state()
    writer = gguf.GGUFWriter(path, ARCH)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_file_type(KINDS[kind][1])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        shape.write(writer)
        write_vocab(writer, vocab)
        for hf_name, (gguf_name, heads) in tensor_map(shape).items():
            w = state[hf_name].numpy()
            if heads:
                w = to_ggml_rows(w, heads)
            data, qtype = _encode(w, stored_kind(kind, w.shape))
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def verify_model(path: Path, source: Source, kind: str) -> dict:
    """Read the file back and check it against the source: keys, every tensor, token ids, template, logits."""
    file = path.name
    reader = open_gguf(path)
    fields = fields_of(reader)
    types = tensor_types(reader)
    checks.require(fields.get(gguf.Keys.General.ARCHITECTURE) == ARCH, file, "general.architecture is not 'llama'")
    checks.require(fields.get(gguf.Keys.General.TYPE) == gguf.GGUFType.MODEL, file, "general.type is not 'model'")
    want_shape = LlamaShape.of_config(source.config)
    try:
        shape, vocab = LlamaShape.read(fields, set(types)), read_vocab(fields)
    except KeyError as exc:
        checks.require(False, file, f"GGUF key {exc} is missing")
    checks.require(shape == want_shape, file, f"its model shape {shape} is not the source's {want_shape}")
    names = tensor_map(shape)
    checks.require(set(types) == {g for g, _ in names.values()}, file,
                   f"its tensors {sorted(set(types) ^ {g for g, _ in names.values()})[:4]} differ from llama.cpp's set")
    read = {name: torch.from_numpy(value) for name, value in tensors_of(reader).items()}
    state = source.merged_state()
    worst = 0.0
    for hf_name, (gguf_name, heads) in names.items():
        got = to_hf_rows(read[gguf_name], heads) if heads else read[gguf_name]
        expect = stored_kind(kind, tuple(state[hf_name].shape))
        checks.require(TYPE_KIND.get(types[gguf_name]) == expect, file,
                       f"tensor {gguf_name} is stored as {types[gguf_name]}, not {expect}")
        worst = max(worst, checks.weights_match(file, gguf_name, got, state[hf_name], expect))
    encode = encoder_of(vocab)
    prompts = checks.token_ids_match(file, encode, source.texts, source.ids)
    renders = checks.chat_template_matches(file, source.tokenizer, vocab.chat_template, CHATS)
    logits = [ggml_forward.logits(shape, read, ids) for ids in source.ids]
    figure = checks.max_abs_diff(logits, source.logits)
    bound = checks.logit_bound(kind, source.logit_scale, shape.layers)
    checks.within(file, f"the max abs logit difference from the source over {len(source.ids)} prompts", figure, bound)
    return {
        "method": "gguf.GGUFReader read-back; tensors dequantized here, Q/K un-permuted and compared with the source "
                  f"rounded to {kind}; logits from a llama.cpp-style forward (adjacent-pair RoPE on the stored Q/K) vs "
                  "the source's; prompts encoded by llama.cpp's tokenizer rules from the embedded vocabulary",
        "max_abs_logit_diff": figure, "bound": bound, "passed": True,
        "max_abs_weight_diff": worst, "logit_scale": source.logit_scale, "prompts": len(source.ids),
        "tokenizer": vocab.model, "tokenizer_ids_equal": True, "token_prompts": prompts,
        "chat_template_renders_equal": renders, "tensors": len(names),
    }
