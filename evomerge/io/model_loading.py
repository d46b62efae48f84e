"""Load a model directory for scoring, with one-line errors for what users get wrong."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError


def check_model_dir(path: Path) -> Path:
    """Fail fast, naming the path, if `path` is not a loadable safetensors model directory."""
    path = Path(path)
    if not path.is_dir():
        raise EvomergeError(f"model directory {path} does not exist; pass a folder with config.json and *.safetensors")
    config = path / "config.json"
    if not config.is_file():
        raise EvomergeError(f"model directory {path} has no config.json; is it a transformers model folder?")
    try:
        json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EvomergeError(f"model directory {path}: config.json is not valid JSON ({exc})") from None
    if not any(path.glob("*.safetensors")):
        raise EvomergeError(f"model directory {path} has no *.safetensors weights (only safetensors are loaded)")
    return path


def load_model_and_tokenizer(path: Path, device: str = "cpu", dtype: str = "float32") -> tuple[Any, Any]:
    """AutoModelForCausalLM + AutoTokenizer from a local folder, never from a hub. `dtype`: a torch
    dtype name, or "auto" for the dtype the weights were saved in (what `lm_eval --model hf` uses)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from evomerge.io.tasks import quiet_offline_env

    quiet_offline_env()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = check_model_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, dtype="auto" if dtype == "auto" else getattr(torch, dtype)
        )
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EvomergeError(f"model directory {path} could not be loaded: {first}") from None
    return model.to(device).eval(), tokenizer
