"""Constrained requests under async scheduling: step N+1's forward is launched before step N is
collected, and its sampling once N's tokens have advanced the grammars (see ``LLMEngine._step``).

A tiny random-weight Llama with a byte-level vocabulary (``write_byte_level``) keeps these fast:
the grammar alone decides what is valid, so every constrained output must parse whatever the
weights.  Shown here: a mixed batch (JSON schemas, a regex, a choice, free requests; greedy and
seeded) gives the same tokens and finish reasons with async scheduling on and off while
constrained steps are launched behind; after every step each matcher has accepted exactly the
tokens collected so far (never one twice, never one missed); a request that ends while its next
token is in flight has that token dropped; an abort mid-stream frees the matcher at once; a
request split between a prefill and an async decode engine gives the tokens of one engine;
n-gram speculation next to constrained requests changes no token."""

from __future__ import annotations

import gc
import json
import re
import weakref
from typing import Optional

import jsonschema
import pytest
import torch
import xgrammar as xgr

from pdmesh.engine import LLM, SamplingParams
from pdmesh.engine.engine import LLMEngine
from pdmesh.engine.grammar import GrammarSpec
from pdmesh.engine.sequence import SequenceStatus
from pdmesh.testing import write_byte_level
from tests.integration.helpers import run_disaggregated

VOCAB, EOS = 1024, 1023
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "ok": {"type": "boolean"}}}
COLOR = {"type": "object", "additionalProperties": False, "required": ["pick", "tags"],
         "properties": {"pick": {"type": "string", "enum": ["red", "green", "blue"]},
                        "tags": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 4}}}}
SPECS = {"person": GrammarSpec("json_schema", json.dumps(PERSON)), "color": GrammarSpec("json_schema", json.dumps(COLOR)),
         "regex": GrammarSpec("regex", r"[a-z]{3,6}-[0-9]{2}"), "choice": GrammarSpec("choice", json.dumps(["yes", "no"]))}
MIX = {  # request id -> params; greedy and seeded, so both modes must agree token for token
    "person": SamplingParams(temperature=0, max_tokens=120, grammar=SPECS["person"]),
    "free-long": SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
    "color": SamplingParams(temperature=0, max_tokens=120, grammar=SPECS["color"]),
    "choice": SamplingParams(temperature=0, max_tokens=20, grammar=SPECS["choice"]),
    "regex": SamplingParams(temperature=0, max_tokens=30, grammar=SPECS["regex"]),
    "free-sampled": SamplingParams(temperature=0.8, seed=3, max_tokens=30, ignore_eos=True),
    "person-sampled": SamplingParams(temperature=1.0, seed=5, max_tokens=120, grammar=SPECS["person"]),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, tokenizer dir): a 2-layer Llama over a 1024-token byte-level vocabulary, EOS 1023."""
    import transformers

    root = tmp_path_factory.mktemp("tiny-bytes")
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   initializer_range=0.3, bos_token_id=None, eos_token_id=EOS, pad_token_id=None)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "model")
    return str(root / "model"), str(write_byte_level(VOCAB, root / "tok", (EOS,)))


def engine(tiny, mode: str) -> LLMEngine:
    model, tok = tiny
    return LLM(model=model, tokenizer=tok, device="cpu", async_scheduling=mode, num_kv_blocks=256, block_size=8).engine


def prompt(i: int) -> list[int]:
    return [(i * 37 + j * 11) % 900 + 40 for j in range(5 + 3 * i)]


def check_matchers(eng: LLMEngine, specs: dict[str, GrammarSpec]) -> int:
    """Every running constrained sequence's matcher equals a fresh one fed the tokens collected so far
    (placeholders, the in-flight step's tokens, are negative): same mask, same termination.  Returns
    how many were checked."""
    checked = 0
    for seq in eng.scheduler.running:
        if seq.grammar is None:
            continue
        done = [t for t in seq.output_token_ids if t >= 0]
        fresh = eng.grammars.new_state(specs[seq.request_id], done)
        want, got = xgr.allocate_token_bitmask(1, VOCAB), xgr.allocate_token_bitmask(1, VOCAB)
        fresh.matcher.fill_next_token_bitmask(want)
        seq.grammar.matcher.fill_next_token_bitmask(got)
        assert torch.equal(want, got) and fresh.terminated == seq.grammar.terminated, (seq.request_id, done)
        checked += 1
    return checked


def run_mix(eng: LLMEngine, extra: Optional[dict[str, tuple[list[int], SamplingParams]]] = None) -> dict:
    """Run MIX (and ``extra``: request id -> (prompt, params)) in one continuous batch, checking the
    matchers after every step."""
    specs = {rid: p.grammar for rid, p in MIX.items() if p.grammar is not None}
    for i, (rid, params) in enumerate(MIX.items()):
        eng.add_request(rid, prompt(i), params)
    for rid, (p, params) in (extra or {}).items():
        eng.add_request(rid, p, params)
    toks: dict[str, list[int]] = {rid: [] for rid in [*MIX, *(extra or {})]}
    reasons: dict[str, str] = {}
    ended_in_flight: set[str] = set()
    behind = checked = 0
    while eng.has_work():
        outs = eng.step()
        for o in outs:
            assert o.request_id not in reasons, f"{o.request_id}: a token after its end"
            toks[o.request_id] += o.new_token_ids
            if o.finished:
                reasons[o.request_id] = o.finish_reason
        step = eng._inflight
        if step is not None:
            behind += any(s.request_id in specs for s in step.sample_seqs)
            ended_in_flight |= {s.request_id for s in step.sample_seqs if s.request_id in reasons}
        checked += check_matchers(eng, specs)
    assert not eng.has_work() and eng.blocks.num_free_blocks == eng.blocks.num_blocks
    eng.blocks.check_invariants()
    return {"toks": toks, "reasons": reasons, "behind": behind, "checked": checked, "ended_in_flight": ended_in_flight}


def test_mixed_constrained_batch_same_tokens_async_on_and_off(tiny):
    off, on = run_mix(engine(tiny, "off")), run_mix(engine(tiny, "on"))
    assert on["toks"] == off["toks"] and on["reasons"] == off["reasons"]
    toks, reasons = on["toks"], on["reasons"]
    tok = engine(tiny, "off").tokenizer
    text = {rid: tok.decode(t, skip_special_tokens=True) for rid, t in toks.items()}
    for rid in ("person", "person-sampled"):
        assert reasons[rid] == "stop" and toks[rid][-1] == EOS
        jsonschema.validate(json.loads(text[rid]), PERSON)
    assert reasons["color"] == "stop"
    jsonschema.validate(json.loads(text["color"]), COLOR)
    assert reasons["regex"] == "stop" and re.fullmatch(r"[a-z]{3,6}-[0-9]{2}", text["regex"]), text["regex"]
    assert reasons["choice"] == "stop" and text["choice"] in ("yes", "no")
    assert reasons["free-long"] == "length" and len(toks["free-long"]) == 40
    assert len(toks["free-sampled"]) == 30
    # constrained steps were launched behind (forward before the previous tokens were known) ...
    assert on["behind"] >= 10 and off["behind"] == 0
    assert on["checked"] > 50
    # ... and requests ended by their grammar while their next token was in flight: it was dropped
    assert {"choice", "regex"} & on["ended_in_flight"], on["ended_in_flight"]
    assert len(toks["choice"]) < len(toks["free-long"])  # it ended early among continuing ones


@pytest.mark.parametrize("mode", ["off", "on"])
def test_speculation_next_to_constrained_requests_gives_the_plain_tokens(tiny, mode):
    """N-gram speculation on: constrained requests never get drafts (their mask depends on every
    token), the free ones do and are verified in the same steps as the constrained rows (masked
    there); tokens and finish reasons are those of decoding without speculation, async scheduling
    off and on, and every matcher holds exactly the tokens collected."""
    model, tok = tiny
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2, "prompt_lookup_min": 1}
    eng = LLM(model=model, tokenizer=tok, device="cpu", async_scheduling=mode, num_kv_blocks=256, block_size=8,
              speculative_config=spec).engine
    # a free request whose prompt holds most tokens the model may emit: a proposal at most steps
    extra = {"free-copy": (list(range(40, 440)), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))}
    got, want = run_mix(eng, extra), run_mix(engine(tiny, "off"), extra)
    assert got["toks"] == want["toks"] and got["reasons"] == want["reasons"]
    assert eng.spec is not None and eng.spec.stats.num_drafts > 0 and got["checked"] > 50


def test_abort_mid_stream_frees_the_matcher_and_the_rest_go_on(tiny):
    eng = engine(tiny, "on")
    eng.add_request("a", prompt(0), MIX["person"])
    eng.add_request("b", prompt(1), MIX["color"])
    eng.add_request("c", prompt(2), SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    got: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    for _ in range(5):
        for o in eng.step():
            got[o.request_id] += o.new_token_ids
    seq_a = next(s for s in eng.scheduler.running if s.request_id == "a")
    assert eng._inflight is not None and seq_a in eng._inflight.sample_seqs and got["a"]
    matcher = weakref.ref(seq_a.grammar)
    assert eng.abort("a")
    gc.collect()
    assert matcher() is None and seq_a.grammar is None  # freed at once, though a's step is in flight
    assert eng.blocks.has_request("a")  # its blocks wait for that step
    specs = {"b": SPECS["color"]}
    while eng.has_work():
        outs = eng.step()
        assert all(o.request_id != "a" for o in outs)
        for o in outs:
            got[o.request_id] += o.new_token_ids
        check_matchers(eng, specs)
    jsonschema.validate(json.loads(eng.tokenizer.decode(got["b"], skip_special_tokens=True)), COLOR)
    assert len(got["c"]) == 30 and eng.num_steps_launched_behind > 5
    assert not eng.blocks.has_request("a") and eng.blocks.num_free_blocks == eng.blocks.num_blocks
    eng.blocks.check_invariants()


def test_finished_requests_release_their_matchers(tiny):
    eng = engine(tiny, "on")
    eng.add_request("p", prompt(3), MIX["person"])
    eng.add_request("f", prompt(4), SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
    eng.step()
    seq = eng.scheduler.running[0] if eng.scheduler.running[0].request_id == "p" else eng.scheduler.running[1]
    ref = weakref.ref(seq.grammar)
    while seq.status is SequenceStatus.RUNNING:
        eng.step()
    gc.collect()
    assert seq.finish_reason == "stop" and ref() is None
    while eng.has_work():
        eng.step()


def test_disaggregated_into_an_async_decode_engine(tiny):
    """Prefill samples token 0 under the mask; the async decode engine replays it into its own matcher
    and goes on launching behind: the tokens of one engine."""
    pre, dec, one = engine(tiny, "off"), engine(tiny, "on"), engine(tiny, "off")
    for i, params in enumerate((MIX["person"], MIX["person-sampled"], MIX["color"])):
        one.add_request("one", prompt(i), params)
        ref: list[int] = []
        while one.has_work():
            for o in one.step():
                ref += o.new_token_ids
        assert run_disaggregated(pre, dec, f"split-{i}", prompt(i), params) == ref
    while dec.has_work():  # the step launched behind the request's last token (its blocks wait for it)
        assert dec.step() == []
    assert dec.num_steps_launched_behind > 0
    assert dec.blocks.num_free_blocks == dec.blocks.num_blocks and not pre.held
