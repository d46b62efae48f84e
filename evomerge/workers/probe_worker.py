"""A small but real worker for executor tests, cluster smoke checks and dispatch-overhead figures.

It builds a random tiny Llama from a seed once (like a real worker loading its sources) and scores
a token sequence with it, so results are a deterministic function of model logits. The payload can
also ask it to misbehave, which is how the pool's failure handling is exercised end to end.

Payload (a dict): `tokens` (list of ints) or `seed` + `length` to draw them; optional faults:
`raise` (message), `nan` (return a NaN fitness), `crash_on_attempts` (list: `os._exit` the process
on those attempts), `sleep` (seconds, interruptible), `spin` (seconds of pure-Python busy loop),
`uninterruptible` (seconds asleep with SIGALRM blocked, so only a process kill ends it).
"""

from __future__ import annotations

import math
import os
import signal
import time
from typing import Any

from evomerge.workers.candidate import Candidate, EvalResult


class ProbeWorker:
    def __init__(self, seed: int = 0, hidden_size: int = 32, layers: int = 2, vocab_size: int = 64):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=128,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = LlamaForCausalLM(config).eval()
        self.vocab_size = vocab_size

    def _tokens(self, payload: dict[str, Any]) -> Any:
        import torch

        if "tokens" in payload:
            return torch.tensor([payload["tokens"]], dtype=torch.long)
        generator = torch.Generator().manual_seed(int(payload["seed"]))
        return torch.randint(0, self.vocab_size, (1, int(payload.get("length", 16))), generator=generator)

    def evaluate(self, candidate: Candidate) -> EvalResult:
        import torch

        payload = candidate.payload
        if candidate.attempt in payload.get("crash_on_attempts", ()):
            os._exit(17)
        if "raise" in payload:
            raise RuntimeError(payload["raise"])
        if payload.get("sleep"):
            time.sleep(payload["sleep"])
        if payload.get("spin"):
            end = time.perf_counter() + payload["spin"]
            while time.perf_counter() < end:
                pass
        if payload.get("uninterruptible"):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            try:
                time.sleep(payload["uninterruptible"])
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})

        tokens = self._tokens(payload)
        started = time.perf_counter()
        with torch.inference_mode():
            logits = self.model(tokens).logits[0, :-1]
        forward = time.perf_counter() - started
        targets = tokens[0, 1:]
        logprob = torch.log_softmax(logits.double(), dim=-1).gather(1, targets[:, None]).mean().item()
        top1 = (logits.argmax(dim=-1) == targets).double().mean().item()
        fitness = math.nan if payload.get("nan") else logprob
        return EvalResult.success(
            candidate.id, fitness, {"logprob": logprob, "top1": top1}, timings={"forward": forward}
        )
