"""Benchmark workloads: ``random`` (token-exact prompts of fixed or ranged lengths), ``shared-prefix``
(groups of prompts sharing a long prefix) and ``jsonl`` (a file of prompts).  Prompts are token id
lists (sent as such to /v1/completions, so their length is exact) with their decoded text (for chat
endpoints and servers that take only text)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence


@dataclass(frozen=True)
class BenchRequest:
    prompt_ids: list[int]
    """Prompt token ids (the exact prompt for /v1/completions)."""
    prompt_text: str
    """The same prompt as text (chat endpoints)."""
    output_len: int
    """max_tokens (with ignore_eos the server generates exactly this many)."""

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


def _lengths(rng: random.Random, n: int, mean: int, range_ratio: float) -> list[int]:
    if not 0 <= range_ratio < 1:
        raise ValueError("--random-range-ratio must be in [0, 1)")
    lo, hi = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


def _token_pool(vocab_size: int, special_ids: Sequence[int]) -> list[int]:
    special = set(special_ids)
    return [i for i in range(vocab_size) if i not in special]


def random_dataset(n: int, input_len: int, output_len: int, vocab_size: int, decode, special_ids: Sequence[int] = (),
                   range_ratio: float = 0.0, seed: int = 0) -> list[BenchRequest]:
    """``n`` prompts of random (non-special) token ids; ``decode(ids) -> str``."""
    rng = random.Random(seed)
    pool = _token_pool(vocab_size, special_ids)
    ins, outs = _lengths(rng, n, input_len, range_ratio), _lengths(rng, n, output_len, range_ratio)
    out = []
    for i in range(n):
        ids = [rng.choice(pool) for _ in range(ins[i])]
        out.append(BenchRequest(ids, decode(ids), outs[i]))
    return out


def shared_prefix_dataset(num_groups: int, prompts_per_group: int, prefix_len: int, suffix_len: int, output_len: int,
                          vocab_size: int, decode, special_ids: Sequence[int] = (), seed: int = 0) -> list[BenchRequest]:
    """Groups of prompts that share a ``prefix_len``-token prefix (each with its own suffix), shuffled."""
    rng = random.Random(seed)
    pool = _token_pool(vocab_size, special_ids)
    out = []
    for _ in range(num_groups):
        prefix = [rng.choice(pool) for _ in range(prefix_len)]
        for _ in range(prompts_per_group):
            ids = prefix + [rng.choice(pool) for _ in range(suffix_len)]
            out.append(BenchRequest(ids, decode(ids), output_len))
    rng.shuffle(out)
    return out


def jsonl_dataset(path: str, encode, decode, default_output_len: int, limit: Optional[int] = None) -> list[BenchRequest]:
    """One JSON object per line: {"prompt": str | [ids], "output_len": int (optional)}."""
    out = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            prompt = obj["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{lineno}: expected a JSON object with 'prompt' ({exc})") from None
        ids = list(prompt) if isinstance(prompt, list) else encode(prompt)
        text = prompt if isinstance(prompt, str) else decode(ids)
        out.append(BenchRequest(ids, text, int(obj.get("output_len", default_output_len))))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


_PASSAGES = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after the "
    "engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. Locally nicknamed La dame "
    "de fer, it was constructed as the centrepiece of the 1889 World's Fair.",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make glucose and "
    "oxygen. It takes place mainly in the leaves, inside small structures called chloroplasts, which contain the green "
    "pigment chlorophyll.",
)
_CODE = ("def total_price(items):\n    total = 0\n    for item in items:\n        total = total + item.price * item.quantity\n"
         "    return total\n\n\ndef average_price(items):\n    if not items:\n        return 0\n"
         "    return total_price(items) / len(items)\n")


def copy_heavy_chats() -> list[list[dict[str, str]]]:
    """Chat requests whose answers quote their prompts (repeat a passage, edit code): the workload
    n-gram speculative decoding is for."""
    out = [[{"role": "user", "content": "Repeat the following passage exactly, word for word:\n\n" + p}] for p in _PASSAGES]
    out.append([{"role": "user", "content": "Rename the function total_price to compute_total everywhere in this code "
                                            "and return the whole code:\n\n" + _CODE}])
    out.append([{"role": "user", "content": "Copy this code exactly, then add a docstring to each function:\n\n" + _CODE}])
    return out


def open_chats() -> list[list[dict[str, str]]]:
    """Chat requests whose answers do not quote the prompt (speculation should find little)."""
    return [[{"role": "user", "content": q}] for q in (
        "Write a short story about a dragon who learns to cook.", "Explain how a bicycle works.",
        "Give me three ideas for a birthday party.", "Why is the sky blue?")]
