"""An lm-eval `HFLM` whose `generate_until` runs a lean batched greedy decode on the resident model.

Why: on small models HF `generate` spends about as long in its per-call and per-step machinery
(config validation and copies, logits processors, stopping criteria that re-decode every sequence
each step) as in the forward passes, and `HFLM` re-tokenises the same prompts for every candidate.
A search scores the same requests thousands of times, so this class

- keeps everything lm-eval decides: the same request order and batches (its `Collator`, sort key and
  grouping by generation kwargs), the same stop strings (the task's `until` plus the EOS text), the
  same left-padded, left-truncated encoding (`tok_batch_encode`), the same text post-processing;
- caches what never changes between candidates: prompt token lengths, each batch's encoding, and
  the decoded text of token sequences;
- decodes greedily with a KV cache, calling the model with exactly the inputs `generate` gives it
  (position ids from the mask, the mask dropped when there is no padding, `logits_to_keep=1`), and
  stops like `generate` does: per sequence at an EOS of the model's generation config (later tokens
  become the pad token), for the whole batch when every sequence contains one stop string in its
  last `len(tokens(stop)) + 2` generated tokens (lm-eval's `MultiTokenEOSCriteria`), or at
  `max_gen_toks`.

So each output equals `HFLM.generate_until`'s item by item (tested on the zoo models and merged
candidates). Anything this path does not reproduce exactly (sampling, extra generation kwargs, a
generation config with logits processors or a non-dynamic cache, thinking tokens, autocast,
`batch_size="auto"`, encoder-decoder models) goes to `HFLM.generate_until` unchanged.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

# Generation-config fields that add logits processors or change stopping/caching in `generate`: a
# model whose config sets any of them away from the default is decoded by HF `generate` instead.
_GENERATE_ONLY_FIELDS = (
    "repetition_penalty",
    "encoder_repetition_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "min_length",
    "min_new_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "suppress_tokens",
    "begin_suppress_tokens",
    "sequence_bias",
    "exponential_decay_length_penalty",
    "renormalize_logits",
    "remove_invalid_values",
    "num_beams",
    "num_return_sequences",
    "max_new_tokens",
    "max_time",
    "stop_strings",
    "guidance_scale",
    "watermarking_config",
    "cache_implementation",
    "prefill_chunk_size",
    "penalty_alpha",
    "dola_layers",
    "output_scores",
    "output_logits",
    "return_dict_in_generate",
    "token_healing",
    "compile_config",
)
# Generation kwargs of a request this path handles (anything else: HF `generate`).
_GREEDY_KWARGS = {"do_sample", "temperature"}
_CACHE_LIMIT = 200_000  # entries per text cache; cleared when full (a search reuses a small set)


class GreedyHFLM(HFLM):
    """HFLM without per-call progress bars and, with `lean=True`, the lean greedy `generate_until`
    (see module doc); `lean=False` is plain HFLM generation."""

    def __init__(self, *args: Any, lean: bool = True, prompt_cache: PromptCache | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lean = lean
        self.prompt_cache = prompt_cache if prompt_cache is not None else PromptCache()
        self.lean_calls = 0  # generate_until calls answered by the lean decode (tests check the path)
        self._forward_args = set(inspect.signature(self.model.forward).parameters)
        self._kwargs_ok: dict[str, bool] = {}
        self._lean_checked: tuple[Any, bool] | None = None  # (generation config, lean decode applies)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=True)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood_rolling(requests, disable_tqdm=True)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if not (self.lean and requests and self._lean_model_ok and all(self._lean_kwargs(r.args[1]) for r in requests)):
            return super().generate_until(requests, disable_tqdm=True)
        self.lean_calls += 1
        texts: list[str] = [""] * len(requests)
        for batch in self.prompt_cache.plan(self, [r.args for r in requests]):
            rows = self._greedy(batch)
            for position, row in zip(batch.positions, rows, strict=True):
                texts[position] = postprocess_generated_text(self.prompt_cache.decode(self, row), batch.until, None)
        for request, text in zip(requests, texts, strict=True):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return texts

    # -- the decode -----------------------------------------------------------------------------

    @torch.no_grad()
    def _greedy(self, batch: Batch) -> list[list[int]]:
        """Greedy continuation token ids per row, stopped as `generate` stops (see module doc).
        EOS and padding are tracked in Python: per step the rows' tokens are read once anyway."""
        from transformers import DynamicCache

        model = self.model
        eos, pad = self._eos_ids()
        device = self.device
        input_ids = batch.input_ids.to(device)
        position_ids = batch.position_ids.to(device)
        attention = batch.attention.to(device) if batch.attention is not None else None
        extra = {"logits_to_keep": 1} if self._accepts("logits_to_keep") else {}
        kv = DynamicCache(config=model.config.get_text_config(decoder=True))
        unfinished = [True] * input_ids.shape[0]
        tracker = _StopTracker(self, batch.until, input_ids.shape[0])
        rows: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
        step_ids = input_ids
        for step in range(batch.max_gen_toks):
            logits = model(
                input_ids=step_ids,
                cache=kv,
                position_ids=position_ids,
                attention_mask=attention,
                use_cache=True,
                return_dict=True,
                **extra,
            ).logits
            tokens = logits[:, -1].argmax(dim=-1).tolist()  # argmax is exact in any float dtype
            for i, token in enumerate(tokens):
                if not unfinished[i]:
                    tokens[i] = token = pad  # `generate` pads a sequence after its EOS
                elif token in eos:
                    unfinished[i] = False
                rows[i].append(token)
            if step + 1 == batch.max_gen_toks or tracker.batch_done(rows) or not any(unfinished):
                break
            step_ids = torch.tensor(tokens, device=device)[:, None]
            position_ids = position_ids[:, -1:] + 1
            if attention is not None:
                attention = torch.cat([attention, attention.new_ones((attention.shape[0], 1))], dim=-1)
        return rows

    def _eos_ids(self) -> tuple[frozenset[int], int | None]:
        """The generation config's EOS ids and the id `generate` pads finished sequences with (read
        per batch: the materializer sets each candidate's generation config on a reused model)."""
        eos = _as_list(self.model.generation_config.eos_token_id)
        pad = self.tokenizer.pad_token_id
        return frozenset(eos), pad if pad is not None else (eos[0] if eos else None)

    # -- when the lean path applies -------------------------------------------------------------

    @property
    def _lean_model_ok(self) -> bool:
        """Whether the lean decode reproduces `generate` for this model. Decided once per generation
        config object: the materializer sets each candidate's (its donor's) on a reused model."""
        config = self.model.generation_config
        if self._lean_checked is None or self._lean_checked[0] is not config:
            self._lean_checked = (config, self._model_setup_ok and _plain_generation_config(config))
        return self._lean_checked[1]

    @functools.cached_property
    def _model_setup_ok(self) -> bool:
        if self.backend != "causal" or self.batch_size == "auto" or self.think_end_token is not None:
            return False
        if getattr(self, "mixed_precision_dtype", None) is not None or self.model.config.is_encoder_decoder:
            return False
        return self._accepts("cache") and self._accepts("position_ids")

    def _accepts(self, argument: str) -> bool:
        return argument in self._forward_args

    def _lean_kwargs(self, gen_kwargs: Any) -> bool:
        """Plain greedy requests: only stop strings, a token budget, do_sample False / temperature 0."""
        if not isinstance(gen_kwargs, dict):
            return False
        key = self.prompt_cache.kwargs_key(gen_kwargs)
        if key not in self._kwargs_ok:
            normalized = normalize_gen_kwargs(gen_kwargs)
            greedy = not normalized.get("do_sample") and normalized.get("temperature", 0.0) == 0.0
            self._kwargs_ok[key] = greedy and set(normalized) - {"until", "max_gen_toks"} <= _GREEDY_KWARGS
        return self._kwargs_ok[key]


def _plain_generation_config(config: Any) -> bool:
    """No field that adds a logits processor or changes stopping or caching in `generate`."""
    from transformers import GenerationConfig

    default = GenerationConfig()
    return all(getattr(config, name, None) == getattr(default, name, None) for name in _GENERATE_ONLY_FIELDS)


def _as_list(token_ids: int | Sequence[int] | None) -> list[int]:
    if token_ids is None:
        return []
    return [int(token_ids)] if isinstance(token_ids, int) else [int(t) for t in token_ids]


class _StopTracker:
    """lm-eval's `MultiTokenEOSCriteria` for a whole batch, one sticky flag per (stop string, row):
    a row is done for a stop string once that string occurs in the text of its last
    `len(tokens(stop)) + 2` generated tokens (special tokens kept); the batch stops when every row is
    done for one of the stop strings."""

    def __init__(self, lm: GreedyHFLM, stops: Sequence[str], rows: int) -> None:
        self.lm = lm
        cache = lm.prompt_cache
        self.checks = [(stop, cache.lookback(lm, stop), cache.stop_hits(stop), [False] * rows) for stop in stops]

    def batch_done(self, rows: Sequence[list[int]]) -> bool:
        finished = False
        for stop, lookback, hits, done in self.checks:
            for i, row in enumerate(rows):
                if not done[i]:
                    window = tuple(row[-lookback:])
                    hit = hits.get(window)
                    if hit is None:
                        hit = hits[window] = stop in self.lm.tok_decode(list(window), skip_special_tokens=False)
                    done[i] = hit
            finished = finished or all(done)
        return finished


@dataclass(frozen=True)
class Batch:
    """One batch as HFLM would run it: request positions, left-padded prompt ids, stop strings."""

    positions: list[int]  # index of each row's request in the generate_until call
    input_ids: torch.Tensor
    position_ids: torch.Tensor  # from the mask, as `generate` derives them
    attention: torch.Tensor | None  # the mask, or None without padding (`generate` drops it then)
    until: list[str]  # the task's stop strings plus the EOS text
    max_gen_toks: int


class PromptCache:
    """What every candidate would recompute: the batches of a request list (order, grouping,
    encodings) and decoded texts. Valid for one tokenizer and batch size (a worker keeps one per
    tokenizer path); entries depend only on strings and token ids, never on model weights."""

    def __init__(self) -> None:
        self._plans: dict[tuple[Any, ...], list[Batch]] = {}
        self._clean: dict[tuple[int, ...], str] = {}  # token ids -> text, special tokens skipped
        self._lookbacks: dict[str, int] = {}
        self._stop_hits: dict[str, dict[tuple[int, ...], bool]] = {}
        self._kwargs_reprs: dict[int, tuple[dict, str]] = {}  # id -> (the dict, its repr)

    def kwargs_key(self, kwargs: dict) -> str:
        """`repr(kwargs)`, computed once per dict object: lm-eval keeps one generation-kwargs dict
        per request instance, and a worker reuses the instances for every candidate."""
        hit = self._kwargs_reprs.get(id(kwargs))
        if hit is not None and hit[0] is kwargs:
            return hit[1]
        self._bound(self._kwargs_reprs)
        text = repr(kwargs)
        self._kwargs_reprs[id(kwargs)] = (kwargs, text)
        return text

    def plan(self, lm: HFLM, args: Sequence[tuple[str, dict]]) -> list[Batch]:
        """HFLM.generate_until's batches for these (context, gen_kwargs) requests: lm-eval's Collator
        (grouped by generation kwargs, longest prompt first), `tok_batch_encode` per batch."""
        kwargs_key = self.kwargs_key
        key = (lm.batch_size, lm.max_length, *((context, kwargs_key(kwargs)) for context, kwargs in args))
        batches = self._plans.get(key)
        if batches is None:
            self._bound(self._plans)
            batches = self._plans[key] = self._build_plan(lm, args)
        return batches

    @staticmethod
    def _build_plan(lm: HFLM, args: Sequence[tuple[str, dict]]) -> list[Batch]:
        collator = Collator(
            list(args),
            sort_fn=lambda req: (-len(lm.tok_encode(req[0])), req[0]),
            group_by="gen_kwargs",
            group_fn=lambda req: req[1],
        )
        chunks = list(collator.get_batched(n=lm.batch_size, batch_fn=None))
        sorted_position = collator.get_original(list(range(len(args))))  # original index -> sorted index
        original = [0] * len(args)
        for index, position in enumerate(sorted_position):
            original[position] = index
        eos_text = lm.tok_decode(lm.eot_token_id, skip_special_tokens=False)
        batches, start = [], 0
        for chunk in chunks:
            contexts, all_kwargs = zip(*chunk, strict=True)
            kwargs = normalize_gen_kwargs(all_kwargs[0], lm.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen_toks = kwargs.pop("max_gen_toks")
            input_ids, mask = lm.tok_batch_encode(
                list(contexts), left_truncate_len=lm.max_length - max_gen_toks, truncation=lm.truncation
            )
            position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
            attention = None if bool((mask == 1).all()) else mask
            batches.append(
                Batch(original[start : start + len(chunk)], input_ids, position_ids, attention, until, max_gen_toks)
            )
            start += len(chunk)
        return batches

    def stop_hits(self, stop: str) -> dict[tuple[int, ...], bool]:
        """Whether `stop` occurs in the text of a window of token ids (special tokens kept, as
        lm-eval's stop criterion decodes it), per window seen so far."""
        hits = self._stop_hits.setdefault(stop, {})
        self._bound(hits)
        return hits

    def lookback(self, lm: HFLM, stop: str) -> int:
        """How many generated tokens lm-eval's stop criterion decodes for `stop`."""
        if stop not in self._lookbacks:
            self._lookbacks[stop] = len(lm.tokenizer.encode(stop, add_special_tokens=False)) + 2
        return self._lookbacks[stop]

    def decode(self, lm: HFLM, tokens: Sequence[int]) -> str:
        """HFLM.tok_decode(tokens): the generated text, special tokens skipped."""
        key = tuple(tokens)
        text = self._clean.get(key)
        if text is None:
            self._bound(self._clean)
            text = self._clean[key] = lm.tok_decode(list(tokens))
        return text

    @staticmethod
    def _bound(cache: dict) -> None:
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
