"""A tiny Llama with a SentencePiece tokenizer laid out as TinyLlama's (Llama 2's): tokenizer.model beside a
tokenizer.json with byte-fallback BPE, a "▁" prefix normalizer and BOS added; trained here on the bundled samples."""

from __future__ import annotations

from pathlib import Path


def build_spm_llama(folder: Path) -> Path:
    """Write the model folder (config, random weights, both tokenizer files) and return it."""
    import sentencepiece
    import torch
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    from tinyllama_mcp.pipeline.tiny_demo import CONFIG, _corpus

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.txt").write_text("\n".join(_corpus()), "utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "tokenizer"), vocab_size=640, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (folder / "corpus.txt").unlink()
    (folder / "tokenizer.vocab").unlink()
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=generate_merges(vocab, scores), unk_token="<unk>",
                                   fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    shape = {k: v for k, v in CONFIG.items()}
    config = LlamaConfig(vocab_size=len(vocab), bos_token_id=1, eos_token_id=2, **shape)
    torch.manual_seed(7)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder
