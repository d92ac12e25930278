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


def test_literal_fields_become_flag_choices_and_tuples_repeat():
    from pdmesh.config import add_flags, from_flags
    from pdmesh.worker import WorkerConfig
    from services.gateway.config import GatewayConfig, parser

    p = argparse.ArgumentParser()
    EngineConfig.add_flags(p)
    with pytest.raises(SystemExit):  # argparse refuses what the Literal does not list
        p.parse_args(["--async-scheduling", "sometimes"])
    assert {a.dest: a.choices for a in p._actions}["attention_backend"] == ("auto", "torch", "flashinfer")
    ns = parser().parse_args(["--api-key", "a", "b", "--api-key", "c", "--tool-call-parser", "llama3_json",
                              "--enable-auto-tool-choice"])
    cfg = from_flags(GatewayConfig, ns)
    assert cfg.api_key == ("a", "b", "c") and cfg.tool_call_parser == "llama3_json"
    assert from_flags(GatewayConfig, parser().parse_args([])).api_key == ()  # not given: the default
    with pytest.raises(SystemExit):
        parser().parse_args(["--tool-call-parser", "mistral"])
    w = argparse.ArgumentParser()
    add_flags(w, WorkerConfig)
    got = from_flags(WorkerConfig, w.parse_args(["--kv-transports", "grpc", "--kv-transports", "cuda_ipc"])).kv_transports
    assert got == ("grpc", "cuda_ipc")
    with pytest.raises(ConfigError, match="--kv-transports: 'rdma' is not one of cuda_ipc, nixl, grpc"):
        WorkerConfig(kv_transports=("grpc", "rdma"))  # the same check when built directly
    assert from_flags(WorkerConfig, w.parse_args([])).nixl_staging_mb == 512
    assert from_flags(WorkerConfig, w.parse_args(["--nixl-staging-mb", "0"])).nixl_staging_mb == 0  # staging off
    for bad in (-1, 65537):
        with pytest.raises(ConfigError, match="--nixl-staging-mb: must be in 0..65536"):
            WorkerConfig(nixl_staging_mb=bad)
    with pytest.raises(ConfigError, match="--enable-auto-tool-choice"):
        GatewayConfig(enable_auto_tool_choice=True)


def test_api_keys_from_flags_file_and_environment(tmp_path, monkeypatch):
    from services.gateway.config import GatewayConfig

    f = tmp_path / "keys"
    f.write_text("# comment\nk-file-1\n\nk-file-2\n")
    monkeypatch.setenv("PDMESH_API_KEY", "k-env-1, k-env-2")
    cfg = GatewayConfig(api_key=("k-flag",), api_key_file=str(f))
    assert cfg.api_keys() == {"k-flag", "k-file-1", "k-file-2", "k-env-1", "k-env-2"}
    monkeypatch.delenv("PDMESH_API_KEY")
    assert GatewayConfig().api_keys() == frozenset()
    f.write_text("# only a comment\n")
    with pytest.raises(ValueError, match="holds no key"):
        GatewayConfig(api_key_file=str(f)).api_keys()


def test_authorize_checks_every_key():
    from pdmesh.openai.auth import authorize

    keys = frozenset({"alpha", "beta"})
    assert authorize(keys, "Bearer beta") and authorize(keys, "bearer alpha ")
    assert not authorize(keys, "Bearer gamma") and not authorize(keys, None) and not authorize(keys, "Basic alpha")
    assert authorize(frozenset(), None)  # no keys configured: open


def test_logit_bias_in_the_sampler():
    logits = torch.tensor([[1.0, 5.0, 4.9, 0.0], [1.0, 5.0, 4.9, 0.0]])
    seqs = [seq(SamplingParams(temperature=0, logit_bias=((3, 10.0),))), seq(SamplingParams(temperature=0, logit_bias=((1, -100.0),)))]
    assert sample(logits, seqs)[0] == [3, 2]


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
