"""Write a tokenizer directory whose vocabulary covers a dummy preset's whole vocabulary, for
serving benchmarks on the GPU machine (no model hub there): token ``i`` is the word ``t<i>``, so
every generated token decodes to visible text and the client sees one content chunk per token,
as it would with the model's real tokenizer.  Prompts are sent as token ids (exact lengths).

Usage: python benchmarks/synthetic_tokenizer.py VOCAB_SIZE OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def write(vocab_size: int, out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    eos = vocab_size - 1
    vocab = {f"t{i}": i for i in range(vocab_size - 1)}
    vocab["</s>"] = eos
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.add_special_tokens(["</s>"])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "unk_token": "t0", "pad_token": "</s>",
        "model_max_length": 1 << 20, "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}"}))
    return out


if __name__ == "__main__":
    write(int(sys.argv[1]), Path(sys.argv[2]))
