"""A realistic-scale evaluation workload that still runs on 2 CPU cores (issue #18, part 1).

- a byte-level BPE tokenizer (8K vocabulary) trained here with `tokenizers` on synthetic text;
- a ~100M-parameter Qwen2-style base (hidden 768, 11 layers, GQA 12/4 heads, SwiGLU 2048,
  untied 16K embeddings: 99.3M parameters) at random init and two "fine-tunes" (base + 1% noise):
  at random init greedy decoding never emits the stop string, so every answer runs its full
  32 tokens, the worst case for the decode loop;
- two lm-eval tasks with local jsonl data: `rw_gen` (generate_until, ~30-token answers,
  `max_gen_toks: 32`) and `rw_mc` (multiple choice, 4 choices, acc), 50 items each.

Everything is built once under benchmarks/work/realistic/ (a few seconds; nothing shipped).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SHAPE = {
    "vocab_size": 16384,
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 11,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}
GEN_TASK, MC_TASK = "rw_gen", "rw_mc"
ITEMS = 50
_SYLLABLES = "ka lo mi ne ru sa ti vo be da fe gi hu jo ku la me ni po qu re so tu vi wa xe yo ze".split()


def _words(rng: random.Random, count: int) -> list[str]:
    out: set[str] = set()
    while len(out) < count:
        out.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))))
    return sorted(out)


def _sentence(rng: random.Random, words: list[str], length: int) -> str:
    return " ".join(rng.choice(words) for _ in range(length))


def build_tokenizer(out: Path, rng: random.Random, words: list[str]) -> Path:
    """Byte-level BPE (GPT-2/Qwen2 style) trained on synthetic sentences, with bos/eos/pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    text = [_sentence(rng, words, rng.randint(8, 40)) + "." for _ in range(20000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    trainer = trainers.BpeTrainer(
        vocab_size=8192, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(text, trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    out.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(out)
    return out


def build_models(root: Path, tokenizer_dir: Path) -> dict[str, Path]:
    """Base (random init) and two fine-tunes (base + 1% Gaussian noise per tensor), fp32."""
    import shutil

    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(
        **SHAPE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    paths = {name: root / name for name in ("base", "ft1", "ft2")}
    for seed, name in enumerate(paths):
        if seed:
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for key, param in model.state_dict().items():
                    noise = torch.randn(param.shape, generator=generator)
                    param.copy_(base[key] + 0.01 * base[key].abs().mean() * noise)
        model.save_pretrained(paths[name])
        for item in tokenizer_dir.iterdir():
            shutil.copy(item, paths[name] / item.name)
    return paths


_GEN_YAML = """\
task: rw_gen
dataset_path: json
dataset_kwargs:
  data_files:
    train: data/rw_gen_train.jsonl
training_split: train
test_split: train
doc_to_text: prompt
doc_to_target: answer
target_delimiter: " "
output_type: generate_until
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 32
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
_MC_YAML = """\
task: rw_mc
dataset_path: json
dataset_kwargs:
  data_files:
    train: data/rw_mc_train.jsonl
training_split: train
test_split: train
doc_to_text: prompt
doc_to_choice: choices
doc_to_target: gold
output_type: multiple_choice
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_tasks(folder: Path, rng: random.Random, words: list[str]) -> Path:
    """`rw_gen`: continue a ~20-word passage with ~25 words (about 30 tokens); `rw_mc`: which word
    completes a ~15-word sentence, 4 choices."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    with open(folder / "data" / "rw_gen_train.jsonl", "w", encoding="utf-8") as handle:
        for _ in range(ITEMS):
            passage = _sentence(rng, words, 20)
            doc = {"prompt": f"Passage: {passage}.\nContinue:", "answer": _sentence(rng, words, 25) + "."}
            handle.write(json.dumps(doc) + "\n")
    with open(folder / "data" / "rw_mc_train.jsonl", "w", encoding="utf-8") as handle:
        for _ in range(ITEMS):
            choices = rng.sample(words, 4)
            doc = {"prompt": f"Complete: {_sentence(rng, words, 15)}", "choices": choices, "gold": rng.randrange(4)}
            handle.write(json.dumps(doc) + "\n")
    (folder / "rw_gen.yaml").write_text(_GEN_YAML, encoding="utf-8")
    (folder / "rw_mc.yaml").write_text(_MC_YAML, encoding="utf-8")
    return folder


def build(root: Path) -> tuple[dict[str, Path], Path]:
    """(model directories, task folder), built under `root` unless already there."""
    paths = {name: root / "models" / name for name in ("base", "ft1", "ft2")}
    tasks = root / "tasks"
    if all((p / "config.json").exists() for p in paths.values()) and (tasks / "rw_mc.yaml").exists():
        return paths, tasks
    rng = random.Random(0)
    words = _words(rng, 3000)
    tokenizer_dir = build_tokenizer(root / "tokenizer", rng, words)
    write_tasks(tasks, rng, words)
    return build_models(root / "models", tokenizer_dir), tasks
