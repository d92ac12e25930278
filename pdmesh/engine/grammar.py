"""Structured outputs: a grammar (JSON schema, any JSON object, regex, a choice of strings, EBNF)
constrains which tokens a request may sample next.

Ownership and lifecycle
-----------------------
* ``GrammarSpec`` is what a request asks for; it travels with ``SamplingParams`` (and in the
  protos, so that every worker of a request sees the same spec).
* ``GrammarEngine`` belongs to one ``LLMEngine``: it compiles specs against that worker's tokenizer
  (xgrammar) once and keeps them in an LRU cache keyed by the spec; compiling is thread-safe, so a
  worker may compile ahead of time off the engine thread (``AsyncEngine.prepare``).
* ``GrammarState`` (one matcher) belongs to one constrained ``Sequence``.  Invariant: it has
  accepted exactly the request's output tokens so far, in order.  The engine accepts every token it
  emits; a decode worker that continues a request computed elsewhere replays the tokens already
  generated there (token 0) when it admits the request, so both halves walk the same states and a
  request gives the same tokens disaggregated or colocated.
* ``GrammarEngine.apply`` masks a batch's logits in place before sampling: one bitmask row per
  sampled sequence, filled on the host for the constrained rows (in parallel threads), copied to
  the logits' device and applied by one kernel (CPU or CUDA).  The runner calls it after launching
  the forward pass, so on CUDA the host work overlaps the GPU's; with async scheduling the engine
  calls it for step N+1 once step N's tokens are accepted, while N+1's forward runs.

A grammar decides where the output ends: once the matcher accepts a stop token (EOS) it is
terminated and the request finishes with ``stop``.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Optional, Sequence, get_args

import torch

if TYPE_CHECKING:
    import xgrammar

GrammarKind = Literal["json_schema", "json_object", "regex", "choice", "ebnf"]
GRAMMAR_KINDS: tuple[str, ...] = get_args(GrammarKind)


class GrammarError(ValueError):
    """A grammar spec that cannot be compiled (bad schema, regex or EBNF); the message says why."""


@dataclass(frozen=True)
class GrammarSpec:
    """What a constrained request's output must match."""

    kind: GrammarKind
    """'json_schema' (``value`` is the schema as JSON text), 'json_object' (any JSON object; ``value``
    is ''), 'regex', 'choice' (``value`` is a JSON list of strings: exactly one of them) or 'ebnf'
    (an xgrammar/GBNF grammar whose start rule is ``root``)."""
    value: str = ""
    """The schema, regex, choices or grammar text."""

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise GrammarError(f"unknown grammar kind {self.kind!r}; expected one of {', '.join(GRAMMAR_KINDS)}")


def _choice_ebnf(value: str) -> str:
    try:
        choices = json.loads(value)
    except json.JSONDecodeError as exc:
        raise GrammarError(f"invalid choice: not a JSON list of strings ({exc.msg})") from None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise GrammarError("invalid choice: expected a non-empty list of non-empty strings")
    # JSON string escapes are valid EBNF string escapes (\" \\ \n \uXXXX)
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=True) for c in choices)


def _grammar(spec: GrammarSpec) -> "xgrammar.Grammar":
    """The tokenizer-independent grammar of ``spec`` (raises GrammarError)."""
    import xgrammar as xgr

    try:
        if spec.kind == "json_schema":
            return _strict_json(xgr.Grammar.from_json_schema(spec.value, any_whitespace=False, strict_mode=True))
        if spec.kind == "json_object":
            return _strict_json(xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False))
        if spec.kind == "regex":
            return xgr.Grammar.from_regex(spec.value)
        if spec.kind == "choice":
            return xgr.Grammar.from_ebnf(_choice_ebnf(spec.value))
        return xgr.Grammar.from_ebnf(spec.value)
    except GrammarError:
        raise
    except (RuntimeError, ValueError, TypeError) as exc:
        raise GrammarError(f"invalid {spec.kind.replace('_', ' ')}: {_short(exc)}") from None


_LOOSE_CHAR = r'[^\"\\\r\n]'
_STRICT_CHAR = r'[^\0-\x1f\"\\\r\n]'


def _strict_json(grammar: "xgrammar.Grammar") -> "xgrammar.Grammar":
    """xgrammar (0.2.9) lets strings with a length bound (maxLength, minLength) hold raw control
    characters, which JSON forbids (json.loads rejects them): its grammar, with those strings'
    character class narrowed to JSON's."""
    import xgrammar as xgr

    text = str(grammar)
    return xgr.Grammar.from_ebnf(text.replace(_LOOSE_CHAR, _STRICT_CHAR), root_rule_name="root") if _LOOSE_CHAR in text else grammar


def _short(exc: BaseException) -> str:
    """xgrammar's message without its C++ source location prefix."""
    text = str(exc).strip()
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    if text.startswith("/") and ": " in text:
        text = text.split(": ", 1)[1]
    return text.splitlines()[0] if text else type(exc).__name__


def validate(spec: GrammarSpec) -> None:
    """Raise GrammarError if ``spec`` cannot be compiled (no tokenizer needed: front ends call it)."""
    _grammar(spec)


class GrammarState:
    """One request's position in its grammar (an xgrammar matcher)."""

    def __init__(self, matcher: "xgrammar.GrammarMatcher") -> None:
        self.matcher = matcher

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False if the grammar does not allow it (state unchanged)."""
        return bool(self.matcher.accept_token(token_id))

    @property
    def terminated(self) -> bool:
        """A stop token was accepted: the output is complete."""
        return bool(self.matcher.is_terminated())


class GrammarEngine:
    """Compiled grammars for one engine's tokenizer and vocabulary, and the batched token mask."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int], cache_size: int = 256,
                 threads: int = 0) -> None:
        import xgrammar as xgr

        threads = threads or max(1, min(8, os.cpu_count() or 1))

        self._xgr = xgr
        self.vocab_size = vocab_size
        """Width of the logits (the model's vocabulary, possibly padded beyond the tokenizer's)."""
        self.info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=sorted(stop_token_ids))
        self._compiler = xgr.GrammarCompiler(self.info, cache_enabled=False, max_threads=threads)
        self._batch = xgr.BatchGrammarMatcher(max_threads=threads)
        self._cache: OrderedDict[GrammarSpec, "xgrammar.CompiledGrammar"] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.num_compiled = 0
        """Specs compiled so far (counter; a cache hit does not count)."""
        self._host: Optional[torch.Tensor] = None
        """[rows, ceil(vocab/32)] int32 host bitmask (pinned on CUDA), grown to the largest batch."""
        self._copied: Optional[torch.cuda.Event] = None
        """Recorded after the latest copy of ``_host`` to the device: the next fill waits for it."""

    def compile(self, spec: GrammarSpec) -> "xgrammar.CompiledGrammar":
        """The compiled grammar of ``spec``, from the cache or compiled now (raises GrammarError)."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        grammar = _grammar(spec)
        try:
            compiled = self._compiler.compile_grammar(grammar)
        except RuntimeError as exc:
            raise GrammarError(f"cannot compile the {spec.kind.replace('_', ' ')}: {_short(exc)}") from None
        with self._lock:
            self.num_compiled += 1
            self._cache[spec] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def new_state(self, spec: GrammarSpec, replay: Sequence[int] = ()) -> GrammarState:
        """A matcher at the start of ``spec``'s grammar, advanced by the tokens ``replay`` (those a
        request already generated elsewhere); GrammarError if the grammar refuses one of them."""
        state = GrammarState(self._xgr.GrammarMatcher(self.compile(spec)))
        for i, tok in enumerate(replay):
            if not state.accept(tok):
                raise GrammarError(f"token {tok} (output position {i}) does not match the grammar")
        return state

    def apply(self, logits: torch.Tensor, states: Sequence[Optional[GrammarState]]) -> None:
        """Mask ``logits`` in place: logits [B, V] float32 on the model's device, ``states`` [B] the
        rows' grammar states (None: unconstrained row, left as is).  Disallowed tokens get -inf.
        The copy to the device is asynchronous; the next call waits for it before it refills the
        pinned bitmask (at once in the engine, which has collected the masked step by then)."""
        rows = [i for i, s in enumerate(states) if s is not None]
        if not rows:
            return
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None
        batch = logits.shape[0]
        if self._host is None or self._host.shape[0] < batch:
            shape = self._xgr.get_bitmask_shape(max(batch, 64), self.vocab_size)
            self._host = torch.empty(shape, dtype=torch.int32, pin_memory=logits.is_cuda)
        host = self._host[:batch]
        self._batch.batch_fill_next_token_bitmask([states[i].matcher for i in rows], host, rows)  # type: ignore[union-attr]
        mask = host
        if logits.is_cuda:
            mask = host.to(logits.device, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(logits.device))
        self._xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=min(self.vocab_size, logits.shape[1]),
                                              indices=rows if len(rows) < batch else None)
