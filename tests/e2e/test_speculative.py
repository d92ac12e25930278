"""N-gram speculative decoding and online quantization in a real mesh: a prefill worker and a
decode worker, both with --quantization int8, the decode worker also with --speculative-config
(decode speculates, prefill is unchanged), behind the gateway.  The text of greedy and seeded
requests, streamed or not, equals one engine with the same quantization and no speculation; the
decode worker's spec_decode counters show the drafts it verified; a structured-output request
(JSON schema) through the speculating decode worker gives the constrained text of one engine;
every block is free afterwards.

(Not fp8 here: W8A8 fp8 and the fp8 KV cache make this small model's logits move by up to ~0.3
with float-level differences between computation orders (batched vs single, prefix-cache hit or
not), so fp8 output is not comparable token for token across paths; int8 is.)"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from pdmesh.engine import LLM, SamplingParams
from tests.meshproc import Services, scrape, wait_idle

MODEL = "SmolLM2-135M-Instruct"
SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 2}
PASSAGE = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
           "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.")
QUANT = ("--quantization", "int8")
COPY = [{"role": "user", "content": "Repeat the following passage exactly, word for word:\n\n" + PASSAGE}]


@pytest.fixture(scope="module")
def svc(tmp_path_factory, embedded_dir):
    s = Services(tmp_path_factory.mktemp("speculative"), prefill=1, decode=1, worker_args=QUANT,
                 role_args={"decode": ("--speculative-config", json.dumps(SPEC))})
    s.wait_workers(1, 1)
    yield s
    rcs = s.stop_all()
    assert all(rc == 0 for rc in rcs.values()), rcs


@pytest.fixture(scope="module")
def plain():
    from pdmesh.config import CacheConfig, DeviceConfig, EngineConfig, ModelConfig

    return LLM(engine_config=EngineConfig(ModelConfig(quantization="int8"), CacheConfig(num_kv_blocks=64),
                                          device=DeviceConfig(device="cpu")))


@pytest.fixture(scope="module")
def client(svc):
    return openai.OpenAI(base_url=svc.base + "/v1", api_key="unused", max_retries=0, timeout=180)


def spec_counters(svc) -> dict[str, float]:
    m = scrape(svc.metrics_url("decode-0"))
    return {k: v for k, v in m.items() if k.startswith("pdmesh:spec_decode")}


def test_greedy_and_streamed_text_equal_decoding_without_speculation(svc, client, plain):
    want = plain.chat([COPY], SamplingParams(temperature=0, max_tokens=40))[0].outputs[0]
    r = client.chat.completions.create(model=MODEL, messages=COPY, max_tokens=40, temperature=0)
    assert r.choices[0].message.content == want.text and r.usage.completion_tokens == len(want.token_ids) == 40
    chunks = list(client.chat.completions.create(model=MODEL, messages=COPY, max_tokens=40, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    c = wait_until_counted(svc)
    assert c["pdmesh:spec_decode_num_accepted_tokens_total"] >= 0.5 * c["pdmesh:spec_decode_num_draft_tokens_total"]
    assert c['pdmesh:spec_decode_num_accepted_tokens_per_pos_total{position="0"}'] > 0
    wait_idle(svc.scheduler, expect=2)


def wait_until_counted(svc) -> dict[str, float]:
    from tests.meshproc import wait_until

    return wait_until(lambda: (c := spec_counters(svc)).get("pdmesh:spec_decode_num_drafts_total", 0) > 0 and c,
                      timeout=10, what="the decode worker's spec_decode counters")


def test_seeded_sampling_equals_decoding_without_speculation(svc, client, plain):
    prompt = "Here is a list of fruits: apple, banana, cherry, apple, banana, cherry, apple,"
    want = plain.generate([prompt], SamplingParams(temperature=0.8, seed=42, max_tokens=24, ignore_eos=True))[0].outputs[0].text
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0.8, seed=42,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == want
    wait_idle(svc.scheduler, expect=2)


def test_structured_output_through_the_speculating_decode_worker(svc, client, plain):
    """A grammar-constrained request never gets drafts (its mask depends on every token) but runs
    on the speculating decode worker next to ones that do: the text of one engine, valid JSON."""
    from pdmesh.engine.grammar import GrammarSpec

    schema = {"type": "object", "additionalProperties": False, "required": ["city", "country"],
              "properties": {"city": {"type": "string", "maxLength": 12}, "country": {"type": "string", "maxLength": 12}}}
    msgs = [{"role": "user", "content": "Where is the Eiffel Tower? Answer in JSON with city and country."}]
    want = plain.chat([msgs], SamplingParams(temperature=0, max_tokens=60,
                                             grammar=GrammarSpec("json_schema", json.dumps(schema))))[0].outputs[0].text
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=60, temperature=0,
                                       response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema}})
    assert r.choices[0].message.content == want
    jsonschema.validate(json.loads(want), schema)
    wait_idle(svc.scheduler, expect=2)


def test_a_stop_string_inside_accepted_drafts_ends_the_choice_there(svc, client, plain):
    """A verify step can accept several tokens at once and run past a stop string: the text, the
    usage and the logprobs end at the token that completed it, as without speculation."""
    want = plain.chat([COPY], SamplingParams(temperature=0, max_tokens=60, stop=["Gustave"], logprobs=0))[0].outputs[0]
    assert want.finish_reason == "stop" and "Eiffel" in want.text, want
    for stream in (False, True):
        r = client.chat.completions.create(model=MODEL, messages=COPY, max_tokens=60, temperature=0, stop=["Gustave"],
                                           logprobs=True, stream=stream, **({"stream_options": {"include_usage": True}} if stream else {}))
        if stream:
            chunks = list(r)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            lps = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
            usage, finish = chunks[-1].usage, next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)
        else:
            text, lps, usage, finish = r.choices[0].message.content, r.choices[0].logprobs.content, r.usage, r.choices[0].finish_reason
        assert (text, finish) == (want.text, "stop"), (stream, text)
        assert usage.completion_tokens == len(want.token_ids) == len(lps), (stream, usage, len(want.token_ids), len(lps))
    assert spec_counters(svc)["pdmesh:spec_decode_num_accepted_tokens_total"] > 0
    wait_idle(svc.scheduler, expect=2)
