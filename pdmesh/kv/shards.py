"""Which KV heads each tensor-parallel rank holds, and how KV moves between workers of different
tensor-parallel sizes (pure arithmetic: no tensors, tested on CPU).

A worker of TP size ``n`` splits a model's ``H`` KV heads over its ranks: with ``H >= n`` rank ``r``
holds heads ``[r * H/n, (r + 1) * H/n)``; with ``H < n`` (more ranks than KV heads) each head is
replicated on ``n / H`` consecutive ranks and rank ``r`` holds head ``r // (n / H)``.  Query heads
are always split evenly, so rank ``r``'s query heads use exactly its KV heads (GQA groups never
straddle ranks).  Every rank's pool has the same block ids (one block manager on rank 0).

A pull between a source of TP ``s`` and a destination of TP ``d`` reads the whole pools (all
local heads) of the source ranks ``source_ranks`` — the first holder of each head, so every head is
read exactly once — and lands them as a list of ``Piece``s: for each destination rank, the runs of
its heads that one source rank holds, with where they sit in each rank's local head axis.  Equal
TP sizes give one piece per rank, all heads (a plain block copy).
"""

from __future__ import annotations

from dataclasses import dataclass


def rank_heads(num_kv_heads: int, tp: int, rank: int) -> tuple[int, int]:
    """Global KV heads ``[start, end)`` held by ``rank`` of a TP-``tp`` worker."""
    if num_kv_heads >= tp:
        n = num_kv_heads // tp
        return rank * n, (rank + 1) * n
    h = rank // (tp // num_kv_heads)
    return h, h + 1


def local_kv_heads(num_kv_heads: int, tp: int) -> int:
    """KV heads in one rank's pool."""
    return max(1, num_kv_heads // tp)


def tp_error(num_heads: int, num_kv_heads: int, intermediate_size: int, tp: int) -> str:
    """Why a model cannot be split over ``tp`` ranks ('' when it can)."""
    if tp < 1:
        return f"--tensor-parallel-size {tp}: must be >= 1"
    if num_heads % tp:
        return f"--tensor-parallel-size {tp}: the model's {num_heads} attention heads do not divide over {tp} ranks"
    if num_kv_heads % tp and tp % num_kv_heads:
        return (f"--tensor-parallel-size {tp}: the model's {num_kv_heads} KV heads neither divide over {tp} ranks "
                f"nor divide {tp} (to be replicated)")
    if intermediate_size % tp:
        return f"--tensor-parallel-size {tp}: the model's MLP width {intermediate_size} does not divide over {tp} ranks"
    return ""


@dataclass(frozen=True)
class Piece:
    """One run of KV heads moved from a source rank to a destination rank (every layer, K and V,
    every block of the pull): source-local heads ``src_heads`` land on destination-local heads
    ``dst_heads`` (equal lengths)."""

    src_rank: int
    dst_rank: int
    src_heads: tuple[int, int]
    """[start, end) in the source rank's local head axis."""
    dst_heads: tuple[int, int]
    """[start, end) in the destination rank's local head axis."""

    @property
    def num_heads(self) -> int:
        return self.src_heads[1] - self.src_heads[0]


def first_holder(num_kv_heads: int, tp: int, head: int) -> int:
    """The lowest rank of a TP-``tp`` worker holding global KV head ``head``."""
    return head // (num_kv_heads // tp) if num_kv_heads >= tp else head * (tp // num_kv_heads)


def plan_pieces(num_kv_heads: int, src_tp: int, dst_tp: int) -> list[Piece]:
    """How a destination of TP ``dst_tp`` pulls from a source of TP ``src_tp``: per destination rank,
    its heads grouped into runs that one source rank holds contiguously, always read from the head's
    first holder (``source_ranks``)."""
    pieces: list[Piece] = []
    for d in range(dst_tp):
        d0, d1 = rank_heads(num_kv_heads, dst_tp, d)
        for g in range(d0, d1):
            s = first_holder(num_kv_heads, src_tp, g)
            sl = g - rank_heads(num_kv_heads, src_tp, s)[0]
            dl = g - d0
            last = pieces[-1] if pieces else None
            if (last is not None and last.dst_rank == d and last.src_rank == s and last.src_heads[1] == sl
                    and last.dst_heads[1] == dl):
                pieces[-1] = Piece(s, d, (last.src_heads[0], sl + 1), (last.dst_heads[0], dl + 1))
            else:
                pieces.append(Piece(s, d, (sl, sl + 1), (dl, dl + 1)))
    return pieces


def source_ranks(num_kv_heads: int, tp: int) -> list[int]:
    """Ranks whose pools, concatenated in order along the head axis, give every KV head once (the
    first holder of each): what a pull reads, and the layout-independent view of a block (KV audit)."""
    return sorted({first_holder(num_kv_heads, tp, h) for h in range(num_kv_heads)})
