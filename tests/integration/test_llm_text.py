"""The offline ``LLM`` front end on the real embedded model: stop strings, n, logprobs."""

import pytest

from pdmesh.engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(embedded_dir):
    return LLM(device="cpu", num_kv_blocks=256)


def test_stop_string_truncates_and_reports_stop(llm):
    base = llm.chat([[{"role": "user", "content": "Count from 1 to 10, separated by commas."}]],
                    SamplingParams(temperature=0, max_tokens=40))[0].outputs[0]
    assert "," in base.text
    word = base.text.split(",")[1].strip()
    res = llm.chat([[{"role": "user", "content": "Count from 1 to 10, separated by commas."}]],
                   SamplingParams(temperature=0, max_tokens=40, stop=(word,)))[0].outputs[0]
    assert res.finish_reason == "stop" and word not in res.text and base.text.startswith(res.text)


def test_n_samples_differ_and_logprobs(llm):
    res = llm.generate(["Once upon a time"], SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=12, logprobs=2))[0]
    assert len(res.outputs) == 3
    assert len({tuple(o.token_ids) for o in res.outputs}) > 1
    for o in res.outputs:
        assert len(o.logprobs) == len(o.token_ids)
        assert all(lp.logprob <= 0 and len(lp.top) == 2 for lp in o.logprobs)
