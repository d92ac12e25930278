import json

import pytest

from tests.meshproc import Mesh, Services, free_port

MODEL = "SmolLM2-135M-Instruct"
KEYS = ("key-flag-1", "key-flag-2", "key-file", "key-env")
"""The features mesh's API keys: two --api-key flags, one in --api-key-file, one in $PDMESH_API_KEY."""
EXTRA_EOS = 7042
"""' Paris' in SmolLM2's vocabulary: the features mesh's generation_config.json makes it an EOS id."""


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, embedded_dir):
    m = Mesh(tmp_path_factory.mktemp("mesh"))
    yield m
    rc = m.stop()
    assert rc == 0, m.proc.tail()
    assert m.service_pids() == [], "orphan processes after pdmesh up stopped"


@pytest.fixture(scope="package")
def features(tmp_path_factory, embedded_dir):
    """One mesh for the OpenAI-feature tests (tools, structured outputs, every field, routes, keys):
    a prefill/decode pair and a colocated worker; the scheduler sends every prompt to the pair
    (--colocate-below-tokens 0) until a test restarts it to send them to the colocated worker.  The
    model is the embedded one with a generation_config.json (an extra EOS id, a max_new_tokens
    default); the gateway has tool_choice 'auto' (hermes), four API keys and the gRPC API."""
    tmp = tmp_path_factory.mktemp("features")
    model = tmp / "smollm2-genconfig"
    model.mkdir()
    for f in embedded_dir.iterdir():
        (model / f.name).symlink_to(f)
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, EXTRA_EOS], "max_new_tokens": 48}))
    (tmp / "keys.txt").write_text(f"# gateway keys\n\n{KEYS[2]}\n")
    model_args = ("--model", str(model), "--served-model-name", MODEL)
    grpc_port = free_port()
    svc = Services(tmp, prefill=1, decode=1, both=1, worker_args=model_args, env={"PDMESH_API_KEY": KEYS[3]},
                   scheduler_args=("--colocate-below-tokens", "0"),
                   gateway_args=(*model_args, "--grpc-port", str(grpc_port), "--enable-auto-tool-choice",
                                 "--tool-call-parser", "hermes", "--api-key", KEYS[0], "--api-key", KEYS[1],
                                 "--api-key-file", str(tmp / "keys.txt")))
    svc.grpc_port = grpc_port
    svc.wait_workers(1, 1, both=1)
    yield svc
    rcs = svc.stop_all()
    assert all(rc == 0 for rc in rcs.values()), rcs
