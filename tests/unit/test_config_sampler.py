"""Config validation and flag docs; sampler semantics on hand-made logits."""

import argparse

import pytest
import torch

from pdmesh.config import CacheConfig, ConfigError, EngineConfig, ModelConfig, field_docs
from pdmesh.engine.sampler import Sampler, build_sampling_batch
from pdmesh.engine.sequence import SamplingParams, Sequence


def test_every_config_field_is_documented():
    for cls in (ModelConfig, CacheConfig):
        docs = field_docs(cls)
        for f in cls.__dataclass_fields__:
            assert docs.get(f), f"{cls.__name__}.{f} has no docstring"


def test_config_validation_names_the_flag():
    with pytest.raises(ConfigError, match="--block-size"):
        CacheConfig(block_size=0)
    with pytest.raises(ConfigError, match="--dtype"):
        ModelConfig(dtype="int3")


def test_flags_roundtrip():
    p = argparse.ArgumentParser()
    EngineConfig.add_flags(p)
    cfg = EngineConfig.from_flags(p.parse_args(["--block-size", "16", "--no-enable-prefix-caching", "--max-num-seqs", "4"]))
    assert cfg.cache.block_size == 16 and not cfg.cache.enable_prefix_caching and cfg.scheduler.max_num_seqs == 4


def seq(params, outputs=(), prompt=(5, 6)):
    return Sequence("r", list(prompt) + list(outputs), len(prompt), params, frozenset({0}))


def sample(logits, seqs):
    s = Sampler(torch.device("cpu"))
    return s(logits, build_sampling_batch(seqs, logits.shape[1], torch.device("cpu")), seqs)


def test_greedy_and_penalties():
    logits = torch.tensor([[1.0, 5.0, 4.9, 0.0]])
    assert sample(logits, [seq(SamplingParams(temperature=0))])[0] == [1]
    # frequency penalty on token 1 (generated twice) flips the argmax to 2
    assert sample(logits, [seq(SamplingParams(temperature=0, frequency_penalty=0.1), outputs=[1, 1])])[0] == [2]
    # repetition penalty applies to prompt tokens too
    assert sample(torch.tensor([[1.0, 5.0, 4.9, 0.0, 0.0, 0.0, 4.0]]),
                  [seq(SamplingParams(temperature=0, repetition_penalty=2.0), prompt=(1,))])[0] == [2]


def test_min_tokens_suppresses_eos():
    logits = torch.tensor([[9.0, 1.0, 0.0]])
    assert sample(logits, [seq(SamplingParams(temperature=0, min_tokens=2))])[0] == [1]
    assert sample(logits, [seq(SamplingParams(temperature=0, min_tokens=2), outputs=[1, 1])])[0] == [0]


def test_top_k_top_p_min_p_restrict_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    for params, allowed in [(SamplingParams(top_k=2), {0, 1}), (SamplingParams(top_p=0.7), {0, 1}),
                            (SamplingParams(min_p=0.5), {0, 1})]:
        got = {sample(logits, [seq(params.with_updates(seed=i))])[0][0] for i in range(60)}
        assert got == allowed, (params, got)


def test_seeded_sampling_is_stateless_per_index():
    logits = torch.randn(1, 50)
    p = SamplingParams(temperature=1.0, seed=7)
    a = [sample(logits, [seq(p, outputs=[3] * i)])[0][0] for i in range(5)]
    b = [sample(logits, [seq(p, outputs=[3] * i)])[0][0] for i in range(5)]
    assert a == b
    assert len(set(sample(logits, [seq(p.with_updates(seed=s))])[0][0] for s in range(30))) > 3


def test_logprobs_shape():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    ids, lps = sample(logits, [seq(SamplingParams(temperature=0, logprobs=2))])
    lp = lps[0]
    assert lp.token_id == 0 and len(lp.top) == 2 and lp.top[0][0] == 0
    assert abs(lp.logprob - torch.log_softmax(logits, -1)[0, 0].item()) < 1e-6


def test_sampling_params_validation():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(max_tokens=0), dict(n=0), dict(min_tokens=5, max_tokens=2)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
