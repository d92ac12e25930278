"""A model's generation defaults (``generation_config.json``), read as vLLM's
``--generation-config auto`` does: its end-of-sequence ids join the model config's and the
tokenizer's (every worker stops on all of them), and its sampling fields become the defaults of
requests that leave them unset (the gateway applies them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

SAMPLING_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                   "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
"""generation_config.json key -> request field it gives a default to (vLLM's set)."""


@dataclass(frozen=True)
class GenerationDefaults:
    """What a model's generation_config.json says (empty when there is none)."""

    eos_token_ids: frozenset[int] = frozenset()
    """End-of-sequence ids it names (``eos_token_id``: one id or a list)."""
    sampling: dict[str, Any] = field(default_factory=dict)
    """Request field -> default value (temperature, top_p, top_k, min_p, repetition_penalty, max_tokens)."""
    source: str = ""
    """The file they came from ('' when none)."""


def find_generation_config(setting: str, model_dir: Optional[Path]) -> Optional[Path]:
    """The generation_config.json that ``--generation-config`` names: 'auto' (the model directory's,
    if any), 'vllm' (none: no model defaults), or a directory holding one (which must exist)."""
    if setting == "vllm":
        return None
    if setting == "auto":
        path = model_dir / "generation_config.json" if model_dir is not None else None
        return path if path is not None and path.is_file() else None
    path = Path(setting)
    path = path / "generation_config.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"--generation-config {setting}: no generation_config.json there")
    return path


def load_generation_defaults(path: Optional[Path]) -> GenerationDefaults:
    """Read ``path`` (None: no defaults); a malformed file is an error naming it."""
    if path is None:
        return GenerationDefaults()
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} is not a JSON object")
    eos = cfg.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"{path}: eos_token_id must be a token id or a list of them")
    sampling = {}
    for key, name in SAMPLING_FIELDS.items():
        value = cfg.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            sampling[name] = value
    return GenerationDefaults(frozenset(ids), sampling, str(path))
