"""The decoder stack every supported family shares, and HF-name weight loading into it.

Families (``llama.py``, ``qwen2.py``, ``qwen3.py``) differ only in the options their ``ModelArch``
sets (biases, q/k norm, experts); they compose these parts rather than subclass them.  A
mixture-of-experts model's sparse layers have a ``SparseMoeBlock`` (``pdmesh.models.moe``) where
the others have a ``GatedMLP``.

Tensor parallelism: each rank builds the same modules with its shard's shapes; ``shard_plan``
says, per parameter, which slices of the full (TP 1) tensor a rank holds, and both checkpoint
loading and dummy weights go through it (so TP n holds exactly TP 1's weights, split).  The
embedding and the LM head are vocabulary-parallel: rank ``r`` holds rows ``[r*Vr, (r+1)*Vr)`` of the
vocabulary padded to a multiple of the ranks; a lookup outside a rank's rows contributes zeros to
the all-reduce, and logits are gathered from every rank (then the padding is cut off).
"""

from __future__ import annotations

from typing import Iterable, Optional, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from pdmesh.distributed.group import TPGroup
from pdmesh.kv.shards import rank_heads
from pdmesh.models.arch import ModelArch
from pdmesh.models.layers import Attention, AttentionContext, BoundRotary, GatedMLP, RMSNorm, RotaryEmbedding
from pdmesh.models.moe import EXPERT_TENSOR, FusedExperts, SparseMoeBlock

Segments = list[tuple[int, int, int]]
"""(length in the full tensor, start of this rank's slice in it, slice length), concatenated in order."""


@runtime_checkable
class _Fusable(Protocol):
    """A module with a fused-kernel switch (``isinstance`` checks that it has ``fused``)."""

    fused: bool


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int, dtype: torch.dtype, tp: TPGroup, expert_parallel: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
        self.self_attn = Attention(arch, layer_idx, dtype, tp)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
        self.mlp = (SparseMoeBlock(arch, dtype, tp, expert_parallel) if arch.is_moe_layer(layer_idx)
                    else GatedMLP(arch, dtype, tp))
        self.tp = tp

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor], rope: BoundRotary,
                ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) -> (mlp output, residual); the residual stream is x + residual (HF's
        ``h = r + f(h)``, added by the next norm, fused with it on CUDA).  Under TP, x (except the
        first layer's, the embedding) is this rank's partial MLP output: the sum over the ranks
        happens with the residual add and the norm (``TPGroup.all_reduce_add_norm``)."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.tp.all_reduce_add_norm(x, residual, self.input_layernorm)
        h = self.self_attn(h, rope, ctx, reduce=False)
        h, residual = self.tp.all_reduce_add_norm(h, residual, self.post_attention_layernorm)
        return self.mlp(h, reduce=False), residual


def vocab_rows(vocab_size: int, tp: TPGroup) -> tuple[int, int, int]:
    """(rows per rank, first vocabulary row of this rank, rows of it that exist)."""
    per = -(-vocab_size // tp.size)
    start = min(vocab_size, tp.rank * per)
    return per, start, min(vocab_size, start + per) - start


class VocabParallelEmbedding(nn.Module):
    """Embedding rows ``[start, start + per)`` of the vocabulary on this rank; a token outside them
    contributes zeros, and the all-reduce assembles every token's row."""

    def __init__(self, arch: ModelArch, dtype: torch.dtype, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        self.per, self.start, _ = vocab_rows(arch.vocab_size, tp)
        self.weight = nn.Parameter(torch.empty(self.per, arch.hidden_size, dtype=dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] int64 -> [T, hidden]."""
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mine = (local >= 0) & (local < self.per)
        x = F.embedding(torch.where(mine, local, 0), self.weight) * mine.unsqueeze(1).to(self.weight.dtype)
        return self.tp.all_reduce(x)


class DecoderModel(nn.Module):
    def __init__(self, arch: ModelArch, dtype: torch.dtype, tp: TPGroup, expert_parallel: bool) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(arch, dtype, tp)
        self.layers = nn.ModuleList(DecoderLayer(arch, i, dtype, tp, expert_parallel) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)


# HF checkpoint names that land in a slice of one of our fused parameters: (ours, shard index).
_STACKED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class CausalLM(nn.Module):
    """A decoder-only LM over flat token batches.

    ``forward(input_ids [T] int64, positions [T] int64, ctx) -> hidden [T, hidden]``;
    ``compute_logits(hidden [N, hidden]) -> [N, vocab] float32``.
    Construct on the meta device, then ``materialize(device)`` and load weights.  Under TP every
    rank runs ``forward`` and ``compute_logits`` on the same inputs (they hold collectives);
    ``expert_parallel`` gives each rank whole experts instead of a slice of every expert.
    """

    def __init__(self, arch: ModelArch, dtype: torch.dtype, tp: Optional[TPGroup] = None,
                 expert_parallel: bool = False) -> None:
        super().__init__()
        self.arch = arch
        self.dtype = dtype
        self.tp = tp or TPGroup.single(torch.device("cpu"))
        self.model = DecoderModel(arch, dtype, self.tp, expert_parallel)
        self.lm_head: Optional[nn.Linear] = None
        if not arch.tie_word_embeddings:
            self.lm_head = nn.Linear(arch.hidden_size, self.model.embed_tokens.per, bias=False, dtype=dtype)
        self.rotary: Optional[RotaryEmbedding] = None

    def materialize(self, device: torch.device, max_len: int) -> None:
        """Allocate real (uninitialised) storage on ``device`` and build the rotary tables."""
        self.to_empty(device=device)
        self.rotary = RotaryEmbedding(self.arch, max_len, device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        assert self.rotary is not None, "materialize() first"
        x = self.model.embed_tokens(input_ids)
        rope = self.rotary.bind(positions, x.dtype)
        residual = None
        for layer in self.model.layers:
            x, residual = layer(x, residual, rope, ctx)
        assert residual is not None  # a model has at least one layer
        return self.tp.all_reduce_add_norm(x, residual, self.model.norm)[0]

    def enable_fused_kernels(self) -> None:
        """Use FlashInfer's fused RMSNorm (+residual add), rope and SiLU*mul kernels, and Triton GEMVs for
        one-row projections (CUDA)."""
        assert self.rotary is not None and self.rotary.cos.is_cuda, "fused kernels need the model on CUDA"
        for m in self.modules():
            if isinstance(m, _Fusable):
                m.fused = True
        self.rotary.fused = True

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] float32 (gathered from every rank under TP)."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = torch.matmul(hidden, weight.t()).float()
        if self.tp.size == 1:
            return logits
        return self.tp.gather_last(logits)[:, :self.arch.vocab_size]

    def shard_plan(self, name: str) -> Optional[tuple[int, Segments]]:
        """Which slices of the full (TP 1) tensor ``name`` (one of our parameters) this rank holds:
        (axis, segments), or None when every rank holds all of it."""
        tp, arch = self.tp, self.arch
        r, n, d = tp.rank, tp.size, arch.head_dim
        leaf = name.rsplit(".", 2)
        kind, what = leaf[-2], leaf[-1]
        if kind == "qkv_proj":
            hq = arch.num_heads // n
            k0, k1 = rank_heads(arch.num_kv_heads, n, r)
            kv = (arch.num_kv_heads * d, k0 * d, (k1 - k0) * d)
            return 0, [(arch.num_heads * d, r * hq * d, hq * d), kv, kv]
        if kind == "gate_up_proj":
            i = arch.intermediate_size // n
            return 0, [(arch.intermediate_size, r * i, i)] * 2
        if kind in ("o_proj", "down_proj") and what == "weight":
            full = arch.num_heads * d if kind == "o_proj" else arch.intermediate_size
            return 1, [(full, r * (full // n), full // n)]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            _, start, rows = vocab_rows(arch.vocab_size, tp)
            return 0, [(arch.vocab_size, start, rows)]
        return None

    def _experts(self, name: str) -> Optional[FusedExperts]:
        """The experts module holding parameter ``name`` (None for any other parameter)."""
        if ".mlp.experts." not in name:
            return None
        module = self.get_submodule(name.rsplit(".", 1)[0])
        return module if isinstance(module, FusedExperts) else None

    def full_shape(self, name: str, param: torch.Tensor) -> tuple[int, ...]:
        """Shape of parameter ``name`` at TP 1."""
        experts = self._experts(name)
        if experts is not None:
            return experts.full_shape(name.rsplit(".", 1)[1])
        plan = self.shard_plan(name)
        if plan is None:
            return tuple(param.shape)
        shape = list(param.shape)
        shape[plan[0]] = sum(full for full, _, _ in plan[1])
        return tuple(shape)

    @torch.no_grad()
    def copy_shard(self, name: str, param: torch.Tensor, full: torch.Tensor, segment: Optional[int] = None) -> None:
        """Copy this rank's slices of ``full`` into ``param``: ``full`` is the whole TP-1 tensor, or
        with ``segment`` only that segment of it (a checkpoint's q, k, v, gate or up tensor).
        ValueError on a shape mismatch."""
        experts = self._experts(name)
        if experts is not None and segment is None:
            return experts.copy_full(name.rsplit(".", 1)[1], full)
        plan = self.shard_plan(name)
        if plan is None:
            plan = (0, [(param.shape[0], 0, param.shape[0])])
        axis, segs = plan
        want = list(param.shape)
        want[axis] = segs[segment][0] if segment is not None else sum(s[0] for s in segs)
        if tuple(full.shape) != tuple(want):
            raise ValueError(f"{name}: checkpoint shape {tuple(full.shape)} != expected {tuple(want)}")
        src_off = dst_off = 0
        for i, (length, start, size) in enumerate(segs):
            if segment is None or i == segment:
                src = full.narrow(axis, (src_off if segment is None else 0) + start, size)
                param.data.narrow(axis, dst_off, size).copy_(src.to(param.dtype))
            src_off += length
            dst_off += size
        if dst_off < param.shape[axis]:  # vocabulary padding rows of the last rank
            param.data.narrow(axis, dst_off, param.shape[axis] - dst_off).zero_()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors into our (partly fused, possibly sharded) parameters; returns the
        names loaded.

        Raises KeyError for a tensor with no home, ValueError for a shape mismatch.
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue
            one_expert = EXPERT_TENSOR.match(name)
            if one_expert is not None:  # one expert's tensor (this rank may not hold that expert)
                prefix, expert, proj = one_expert.groups()
                experts = self._experts(f"{prefix}.down_proj")
                if experts is None:
                    raise KeyError(f"checkpoint tensor {name!r} has no matching parameter")
                experts.copy_expert(int(expert), proj, tensor)
                loaded.add(name)
                continue
            target, shard = name, None
            for hf, (ours, idx) in _STACKED.items():
                if f".{hf}." in name:
                    target, shard = name.replace(f".{hf}.", f".{ours}."), idx
                    break
            if target not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no matching parameter")
            self.copy_shard(target, params[target], tensor, shard)
            loaded.add(name)
            experts = self._experts(target)
            if experts is not None:  # transformers 5's fused layout: every expert at once
                loaded |= {n for n in experts.checkpoint_names(target.rsplit(".", 1)[0])
                           if n.endswith(".down_proj.weight") == target.endswith(".down_proj")}
        return loaded

    def expected_weight_names(self) -> set[str]:
        """HF names a complete checkpoint must provide."""
        names: set[str] = set()
        for name, _ in self.named_parameters():
            experts = self._experts(name)
            if experts is not None:
                names.update(experts.checkpoint_names(name.rsplit(".", 1)[0]))
            elif ".qkv_proj." in name:
                names.update(name.replace(".qkv_proj.", f".{p}.") for p in ("q_proj", "k_proj", "v_proj"))
            elif ".gate_up_proj." in name:
                names.update(name.replace(".gate_up_proj.", f".{p}.") for p in ("gate_proj", "up_proj"))
            else:
                names.add(name)
        return names
