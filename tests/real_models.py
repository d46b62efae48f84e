"""Tiny models of real architectures with real tokenizers, and lm-eval tasks with local data, all
built on the fly (no weights shipped, no hub), for the evaluation-agreement tests.

- Tokenizers, trained here with the `tokenizers` library on the task text and wrapped as
  `PreTrainedTokenizerFast` with bos/eos/pad and a chat template:
  `bpe` (byte-level BPE, GPT-2/Qwen2 style: bytes mapped to printable characters, no unknown
  token, no BOS added to encodings) and `sentencepiece` (Metaspace pre-tokenizer and Unigram model,
  Llama-2/Gemma style: `▁` marks word starts, a space is prepended to the first word only, BOS
  prepended by the post-processor) and `sentencepiece_bpe` (Metaspace and BPE with byte fallback,
  Llama-2/Gemma's own model type: characters it never saw, the newline among them, become
  `<0x..>` byte tokens, so a stop string is the decoded text of byte tokens and a window may end
  inside a UTF-8 character). The BPE tokenizer keeps its chat template in tokenizer_config.json,
  the others in chat_template.jinja (both ways transformers 5 reads one); the Gemma-style template
  writes the BOS text itself and refuses a system turn, so lm-eval's BOS detection and its
  system-less fallback run; the Llama-2-style one closes each assistant turn with the EOS text.
- Models: tiny random Llama, Qwen2, Gemma2 and Phi3 (`FAMILIES`), optionally trained for a few
  dozen steps on the task text (`train_family`: a base, then two fine-tunes on different halves of
  the facts), so that scores are neither all 0 nor all 1 and merges differ from their sources.
  transformers 5 loads the tokenizer of a `qwen2` model directory as `Qwen2Tokenizer` whatever its
  tokenizer_config.json says, which swaps in Qwen2's pre-tokenizer (its split regex, byte level)
  and NFC: our BPE tokenizer encodes the same under it, the SentencePiece one loses characters. So
  Qwen2 is paired with the BPE tokenizer only (`PAIRS_OK`), and `train_family` checks that the model
  directory's tokenizer encodes the task text as the tokenizer that was built.
- Tasks (`write_tasks`): "opposite of a word" facts, as a generate_until task (exact match, stop at
  a newline) and a multiple-choice loglikelihood task (acc over four words), each with train /
  validation / test jsonl files, plus few-shot variants of both.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# Word pairs; both directions are facts ("opposite of hot: cold", "opposite of cold: hot").
PAIRS = [
    ("hot", "cold"),
    ("up", "down"),
    ("big", "small"),
    ("fast", "slow"),
    ("early", "late"),
    ("open", "closed"),
    ("light", "dark"),
    ("happy", "sad"),
    ("rich", "poor"),
    ("hard", "soft"),
    ("wet", "dry"),
    ("full", "empty"),
    ("high", "low"),
    ("long", "short"),
    ("loud", "quiet"),
    ("near", "far"),
    ("strong", "weak"),
    ("thick", "thin"),
    ("left", "right"),
    ("push", "pull"),
    ("buy", "sell"),
    ("first", "last"),
    ("win", "lose"),
    ("day", "night"),
]
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>"]
TOKENIZERS = ("bpe", "sentencepiece", "sentencepiece_bpe")

# ChatML (Qwen2 style) for the BPE tokenizer; Gemma style (BOS written by the template, no system
# role: it raises, and lm-eval then retries without the system message) for the SentencePiece one.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA2 = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}<<SYS>>\n{{ m['content'] }}\n<</SYS>>\n\n"
    "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %} {{ m['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)
GEMMA = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def facts() -> list[tuple[str, str]]:
    return [(a, b) for a, b in PAIRS] + [(b, a) for a, b in PAIRS]


def prompt(word: str) -> str:
    return f"Q: opposite of {word}?\nA:"


def corpus(pairs: Sequence[tuple[str, str]] | None = None) -> list[str]:
    """Training text: one fact per line as the tasks ask it (answer after a space, then a newline)."""
    return [f"{prompt(a)} {b}\n" for a, b in (facts() if pairs is None else pairs)]


# -- tokenizers -----------------------------------------------------------------------------------


def build_tokenizer(kind: str, out: Path) -> Path:
    """Train a small tokenizer of `kind` (one of `TOKENIZERS`) on the task text; save to `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    # the facts one per line and as few-shot blocks (blank lines between: BPE learns "\n\n" tokens)
    text = (
        corpus() * 4
        + ["\n".join(corpus())] * 4
        + ["The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 , . ; ! ?"]
    )
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tok.train_from_iterator(text, trainer)
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        template = CHATML
    elif kind == "sentencepiece":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.UnigramTrainer(vocab_size=200, special_tokens=SPECIALS, unk_token="<unk>")
        tok.train_from_iterator(text, trainer)
        template = GEMMA
    elif kind == "sentencepiece_bpe":
        tok = _byte_fallback_bpe([line.replace("\n", " ") for line in text])  # no newline: it falls back to bytes
        template = LLAMA2
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; use one of {', '.join(TOKENIZERS)}")
    if kind != "bpe":
        bos = tok.token_to_id("<bos>")
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)]
        )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIALS[4:],
    )
    wrapped.chat_template = template
    out.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(out, save_jinja_files=kind != "bpe")
    return out


def _byte_fallback_bpe(text: Sequence[str]) -> Any:
    """Metaspace + BPE trained on `text`, then rebuilt with the 256 `<0x..>` byte tokens as ordinary
    vocabulary entries (not special: decoding with special tokens skipped must keep them) and
    byte fallback on."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = metaspace
    trained.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS))
    vocab = trained.get_vocab()
    merges = [tuple(pair) for pair in json.loads(trained.to_str())["model"]["merges"]]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.add_special_tokens(SPECIALS)
    tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tok


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


# -- models ---------------------------------------------------------------------------------------

SMALL = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
# family -> (transformers config class, settings on top of SMALL)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "gemma2": ("Gemma2Config", {"head_dim": 8, "sliding_window": 16}),
    "phi3": ("Phi3Config", {}),
}
PAIRS_OK = [(kind, family) for family in FAMILIES for kind in TOKENIZERS if kind == "bpe" or family != "qwen2"]


def build_model(family: str, tokenizer: Any, seed: int) -> torch.nn.Module:
    """A tiny random model of `family` sized to the tokenizer, with its special token ids."""
    import transformers

    class_name, extra = FAMILIES[family]
    config = getattr(transformers, class_name)(
        **SMALL,
        **extra,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def train(
    model: torch.nn.Module, tokenizer: Any, lines: Sequence[str], steps: int, seed: int, lr: float = 3e-3
) -> None:
    """A few AdamW steps of next-token loss on `lines` (batches of 16, padding masked out)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        batch = tokenizer([*rng.sample(list(lines), min(16, len(lines)))], padding=True, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def save(model: torch.nn.Module, tokenizer_dir: Path, out: Path, dtype: torch.dtype | None = None) -> Path:
    """The model (cast to `dtype` if given), its generation config and the tokenizer files, as a
    model directory."""
    import copy
    import shutil

    if dtype is not None:
        model = copy.deepcopy(model).to(dtype)
    model.save_pretrained(out)
    for item in tokenizer_dir.iterdir():
        shutil.copy(item, out / item.name)
    return out


def train_family(family: str, tokenizer_dir: Path, out: Path, steps: int = 40, seed: int = 0) -> dict[str, Path]:
    """A base trained on every fact for `steps` steps, and two fine-tunes of it (`steps // 2` more
    steps each on one half of the facts), saved under `out`: {"base", "ft1", "ft2"} -> directory."""
    tokenizer = load_tokenizer(tokenizer_dir)
    model = build_model(family, tokenizer, seed)
    lines = corpus()
    train(model, tokenizer, lines, steps, seed)
    dirs = {"base": save(model, tokenizer_dir, out / "base")}
    loaded = load_tokenizer(dirs["base"])
    texts = [*lines, tokenizer.apply_chat_template([{"role": "user", "content": lines[0]}], tokenize=False)]
    if loaded(texts)["input_ids"] != tokenizer(texts)["input_ids"]:
        raise ValueError(f"transformers loads another tokenizer ({type(loaded).__name__}) from a {family} directory")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i, half in enumerate((lines[::2], lines[1::2]), start=1):
        model.load_state_dict(state)
        train(model, tokenizer, half, steps // 2, seed + i, lr=2e-3)
        dirs[f"ft{i}"] = save(model, tokenizer_dir, out / f"ft{i}")
    return dirs


# -- tasks ----------------------------------------------------------------------------------------

GEN_TASK = "opp_gen"
MC_TASK = "opp_mc"
GEN_FEWSHOT_TASK = "opp_gen_2shot"
MC_FEWSHOT_TASK = "opp_mc_2shot"

_COMMON = """\
dataset_path: json
dataset_kwargs:
  data_files:
    train: data/opp_train.jsonl
    validation: data/opp_validation.jsonl
    test: data/opp_test.jsonl
training_split: train
validation_split: validation
test_split: test
fewshot_split: train
doc_to_text: prompt
"""
_GEN = """\
output_type: generate_until
doc_to_target: answer
target_delimiter: " "
generation_kwargs:
  until: ["\\n", "?"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    regexes_to_ignore: ["^\\\\s+", "\\\\s+$"]
metadata:
  version: 1.0
"""
_MC = """\
output_type: multiple_choice
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_tasks(folder: Path, seed: int = 0) -> Path:
    """lm-eval task YAMLs (generate_until and multiple choice, zero-shot and 2-shot) with their
    jsonl data (train 24 / validation 12 / test 12 facts) in `folder`; returns the folder."""
    rng = random.Random(seed)
    items = facts()
    rng.shuffle(items)
    words = sorted({w for pair in PAIRS for w in pair})
    splits = {"train": items[:24], "validation": items[24:36], "test": items[36:]}
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with open(folder / "data" / f"opp_{split}.jsonl", "w", encoding="utf-8") as handle:
            for word, answer in rows:
                wrong = rng.sample([w for w in words if w not in (word, answer)], 3)
                choices = [*wrong, answer]
                rng.shuffle(choices)
                doc = {"prompt": prompt(word), "answer": answer, "choices": choices, "gold": choices.index(answer)}
                handle.write(json.dumps(doc) + "\n")
    for name, body, shots in (
        (GEN_TASK, _GEN, 0),
        (MC_TASK, _MC, 0),
        (GEN_FEWSHOT_TASK, _GEN, 2),
        (MC_FEWSHOT_TASK, _MC, 2),
    ):
        extra = f"num_fewshot: {shots}\n" if shots else ""
        (folder / f"{name}.yaml").write_text(f"task: {name}\n{_COMMON}{extra}{body}", encoding="utf-8")
    return folder
