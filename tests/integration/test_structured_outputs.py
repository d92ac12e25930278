"""Structured outputs, logit_bias and prompt logprobs in the engine, on the real embedded model:
constrained text always parses and obeys its schema (greedy and sampled), a request split between
a prefill and a decode engine gives exactly the tokens of one engine (the decode side replays
token 0 into its own matcher), async scheduling gives the same tokens (test_grammar_async.py
covers it in depth), grammars compile once per spec."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from pdmesh.engine import LLM, RequestRejected, SamplingParams
from pdmesh.engine.grammar import GrammarSpec
from tests.integration.helpers import run_disaggregated

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "country", "capital"],
          "properties": {"city": {"type": "string", "maxLength": 24},
                         "country": {"type": "string", "enum": ["France", "Germany", "Italy", "Spain"]},
                         "capital": {"type": "boolean"}}}
JSON = GrammarSpec("json_schema", json.dumps(SCHEMA))
ASK = [{"role": "user", "content": "Describe Paris as a JSON object."}]


@pytest.fixture(scope="module")
def llm(embedded_dir):
    return LLM(device="cpu", num_kv_blocks=256, async_scheduling="off")


def chat_ids(llm: LLM, messages=ASK) -> list[int]:
    return llm.tokenizer.apply_chat_template(messages)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=80, grammar=JSON),
    SamplingParams(temperature=1.0, seed=11, max_tokens=80, grammar=JSON),
    SamplingParams(temperature=1.2, top_p=0.95, seed=5, max_tokens=80, grammar=JSON, n=3),
], ids=["greedy", "sampled", "n3"])
def test_json_schema_output_parses_and_obeys(llm, params):
    for out in llm.chat([ASK], params)[0].outputs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)
        assert out.token_ids[-1] in llm.engine.eos_token_ids  # the grammar ended it with EOS


@pytest.mark.parametrize("spec,check", [
    (GrammarSpec("choice", json.dumps(["yes", "no", "maybe"])), lambda t: t in ("yes", "no", "maybe")),
    (GrammarSpec("regex", r"[0-9]{3}-[0-9]{4}"), lambda t: len(t) == 8 and t[3] == "-" and (t[:3] + t[4:]).isdigit()),
    (GrammarSpec("json_object"), lambda t: isinstance(json.loads(t), dict)),
    (GrammarSpec("ebnf", 'root ::= "The answer is " ("red" | "blue") "."'), lambda t: t in ("The answer is red.", "The answer is blue.")),
])
def test_other_grammar_kinds(llm, spec, check):
    out = llm.chat([ASK], SamplingParams(temperature=0.7, seed=2, max_tokens=100, grammar=spec))[0].outputs[0]
    assert out.finish_reason == "stop" and check(out.text), out.text


def test_disaggregated_equals_one_engine_for_the_same_seed(llm, embedded_dir):
    prompt = chat_ids(llm)
    pre = LLM(device="cpu", num_kv_blocks=256).engine
    for params in (SamplingParams(temperature=1.0, seed=7, max_tokens=80, grammar=JSON),
                   SamplingParams(temperature=0, max_tokens=80, grammar=JSON),
                   SamplingParams(temperature=0.9, seed=3, max_tokens=20, grammar=GrammarSpec("regex", r"[a-z]+ [a-z]+"))):
        one = llm.generate([prompt], params, detokenize=False)[0].outputs[0].token_ids
        split = run_disaggregated(pre, llm.engine, f"split-{params.seed}-{params.temperature}", prompt, params)
        assert split == one
    assert not pre.held and pre.blocks.num_free_blocks == pre.blocks.num_blocks


def test_decode_side_replays_token_zero_and_refuses_a_foreign_one(llm):
    prompt = chat_ids(llm)
    params = SamplingParams(temperature=0, max_tokens=40, grammar=JSON)
    bad_first = llm.tokenizer.encode("x", add_special_tokens=False)[0]  # a JSON object starts with '{'
    with pytest.raises(RequestRejected, match="does not match the grammar"):
        llm.engine.admit_remote("foreign", prompt, bad_first, params)
    assert not llm.engine.blocks.has_request("foreign")


def test_async_scheduling_gives_the_same_constrained_tokens(embedded_dir, llm):
    prompts = [chat_ids(llm), chat_ids(llm, [{"role": "user", "content": "Say hello."}])]
    mixed = [SamplingParams(temperature=0.8, seed=4, max_tokens=60, grammar=JSON),
             SamplingParams(temperature=0.8, seed=4, max_tokens=30, ignore_eos=True)]
    on = LLM(device="cpu", num_kv_blocks=256, async_scheduling="on")
    got = {}
    for name, engine in (("off", llm.engine), ("on", on.engine)):
        for i, (p, sp) in enumerate(zip(prompts, mixed)):
            engine.add_request(f"{name}{i}", p, sp)
        toks: dict[str, list[int]] = {}
        while engine.has_work():
            for out in engine.step():
                toks.setdefault(out.request_id, []).extend(out.new_token_ids)
        got[name] = [toks[f"{name}{i}"] for i in range(2)]
    assert got["on"] == got["off"]
    json.loads(llm.tokenizer.decode(got["on"][0]))
    # the constrained request's steps were launched behind too (its sampling waited for its mask)
    assert on.engine.num_steps_launched_behind > 20


def test_grammars_compile_once_per_spec_and_bad_ones_are_rejected(llm):
    spec = GrammarSpec("json_schema", json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}},
                                                  "required": ["ok"], "additionalProperties": False}))
    before = llm.engine.grammars.num_compiled
    for _ in range(3):
        out = llm.chat([ASK], SamplingParams(temperature=0, max_tokens=20, grammar=spec))[0].outputs[0]
        assert json.loads(out.text)["ok"] in (True, False)
    assert llm.engine.grammars.num_compiled == before + 1
    for bad in (GrammarSpec("json_schema", '{"type": "objekt"}'), GrammarSpec("regex", "(unclosed"),
                GrammarSpec("ebnf", "root ::= "), GrammarSpec("choice", "[]")):
        with pytest.raises(RequestRejected, match="invalid"):
            llm.engine.add_request("bad", [1, 2, 3], SamplingParams(grammar=bad))
    assert not llm.engine.has_work()


def test_logit_bias_forces_and_bans_tokens(llm):
    prompt = chat_ids(llm)
    base = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6), detokenize=False)[0].outputs[0].token_ids
    forced = llm.tokenizer.encode(" banana", add_special_tokens=False)[0]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, logit_bias=((forced, 100.0),)),
                       detokenize=False)[0].outputs[0].token_ids
    assert out == [forced] * 6
    banned = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, logit_bias=((base[0], -100.0),)),
                          detokenize=False)[0].outputs[0].token_ids
    assert banned[0] != base[0]
    sampled = llm.generate([prompt], SamplingParams(temperature=1.0, seed=1, max_tokens=6, logit_bias=((forced, 100.0),)),
                           detokenize=False)[0].outputs[0].token_ids
    assert sampled == [forced] * 6
    with pytest.raises(RequestRejected, match="vocabulary"):
        llm.engine.add_request("big", [1], SamplingParams(logit_bias=((10**7, 1.0),)))


def test_prompt_logprobs_match_transformers_and_skip_the_prefix_cache(embedded_dir, smol_hf, tokenizer):
    llm = LLM(device="cpu", num_kv_blocks=256, max_num_batched_tokens=16, block_size=8)  # prompt in 16-token chunks
    prompt = tokenizer.encode("The quick brown fox jumps over the lazy dog, and then the dog sleeps all afternoon.")
    with torch.no_grad():
        ref = torch.log_softmax(smol_hf(torch.tensor([prompt])).logits[0].float(), dim=-1)
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1), detokenize=False)  # fills the prefix cache
    res = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3), detokenize=False)[0]
    lps = res.prompt_logprobs
    assert res.num_cached_tokens == 0 and len(lps) == len(prompt) - 1
    for pos, lp in enumerate(lps):
        want = ref[pos, prompt[pos + 1]].item()
        assert lp.token_id == prompt[pos + 1] and abs(lp.logprob - want) < 2e-3, (pos, lp.logprob, want)
        assert lp.rank == int((ref[pos] > ref[pos, prompt[pos + 1]]).sum()) + 1
        assert [t for t, _ in lp.top] == ref[pos].topk(3).indices.tolist()
