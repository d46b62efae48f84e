"""Tiny Llama checkpoints with real BPE tokenizers, generated on the fly (no hub, no shipped files),
for the vocabulary-merging tests: a base, fine-tunes of it, and fine-tunes whose tokenizers grew
added tokens (with resized embeddings), as real instruction-tuned checkpoints do."""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "merging models by token strings keeps every row in its place",
    "a small vocabulary for a tiny llama that nobody will ever train",
    "evolutionary search over merge recipes with tokenizers that differ",
] * 4
SPECIALS = ["<unk>", "<s>", "</s>"]
ADDED = [f"<extra_{i}>" for i in range(8)]

LLAMA_KW = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
)


FOREIGN = ["zebras quietly juggle xylophones", "vexing quizzes puzzle wizards"] * 4


def bpe_tokenizer(vocab_size: int = 120, corpus: list[str] = CORPUS):
    """A BPE tokenizer (whitespace pre-tokenizer) trained here on a fixed corpus (deterministic)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def make_model(
    path: Path,
    seed: int,
    *,
    base: Path | None = None,
    added: list[str] | tuple[str, ...] = (),
    special: bool = False,
    noise: float = 0.02,
    tie: bool = False,
    vocab_size: int | None = None,
    corpus: list[str] | None = None,
) -> Path:
    """A LlamaForCausalLM and its tokenizer at `path`. With `base`: a fine-tune (base weights plus
    seeded noise, same tokenizer) that may add tokens; the embeddings grow to the new tokenizer
    (or to `vocab_size` rows, e.g. padded), new rows random."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if corpus is not None:
        tokenizer = bpe_tokenizer(60, corpus)
    else:
        tokenizer = AutoTokenizer.from_pretrained(base) if base is not None else bpe_tokenizer()
    if added:
        if special:
            tokenizer.add_special_tokens({"additional_special_tokens": list(added)})
        else:
            tokenizer.add_tokens(list(added))
    rows = vocab_size or len(tokenizer)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=rows, tie_word_embeddings=tie, **LLAMA_KW))
    if base is not None:
        from safetensors.torch import load_file

        state = load_file(str(base / "model.safetensors"))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in state:
                    old = state[name]
                    fresh = param.clone()
                    fresh[tuple(slice(0, n) for n in old.shape)] = old
                    param.copy_(fresh + noise * torch.randn(param.shape, generator=generator))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def vocab_zoo(root: Path) -> dict[str, Path]:
    """base; ft1 (same tokenizer); ft_added and ft_added2 (the same 8 added tokens, embeddings
    resized); ft_other (2 special added tokens, one of them also in ft_added); foreign (a BPE
    vocabulary trained on other text); ft_padded (128 rows, 120 tokens); ft_unresized (8 added
    tokens without rows); tied variants."""
    base = make_model(root / "base", 0)
    zoo = {"base": base}
    zoo["ft1"] = make_model(root / "ft1", 1, base=base)
    zoo["ft_added"] = make_model(root / "ft_added", 2, base=base, added=ADDED)
    zoo["ft_added2"] = make_model(root / "ft_added2", 6, base=base, added=ADDED)
    zoo["ft_other"] = make_model(root / "ft_other", 3, base=base, added=["<extra_3>", "<tool>"], special=True)
    zoo["ft_padded"] = make_model(root / "ft_padded", 8, base=base, vocab_size=128)  # rows past the tokenizer
    zoo["ft_unresized"] = make_model(root / "ft_unresized", 9, base=base, added=ADDED, vocab_size=120)  # no rows
    zoo["foreign"] = make_model(root / "foreign", 7, corpus=FOREIGN)  # another BPE vocabulary
    zoo["tied_base"] = make_model(root / "tied_base", 4, tie=True)
    zoo["tied_added"] = make_model(root / "tied_added", 5, base=zoo["tied_base"], added=ADDED, tie=True)
    return zoo
