"""Every field honest and every route there, through the running mesh with the ``openai`` SDK:
refused fields are 400s naming them, logit_bias forces and bans tokens, echo (with prompt
logprobs), stop_token_ids, continuous usage, the model's generation_config.json (EOS ids in every
worker, default max_tokens), models.retrieve, /tokenize, /detokenize, /version, /metrics on the
API port, JSON 404/405, several API keys, TLS on HTTP and gRPC, and an access log without text."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import httpx
import openai
import pytest

from pdmesh.client import InferenceClient, collect
from pdmesh.openai.fields import FIELDS
from tests.certs import make_certs
from tests.e2e.conftest import EXTRA_EOS, KEYS, MODEL
from tests.meshproc import Proc, free_port, mesh_secret_file, wait_http

AUTH = {"Authorization": f"Bearer {KEYS[0]}"}
REFUSED_SAMPLES = {
    "suffix": "tail", "best_of": 3, "functions": [{"name": "f"}], "function_call": "auto",
    "audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"}, "web_search_options": {}, "reasoning_effort": "low",
    "verbosity": "low", "service_tier": "flex", "store": True, "guided_decoding_backend": "outlines",
    "structural_tag": "{}", "guided_whitespace_pattern": " ", "use_beam_search": True, "length_penalty": 0.5,
    "truncate_prompt_tokens": 4, "allowed_token_ids": [1], "bad_words": ["x"], "spaces_between_special_tokens": False,
    "documents": [{"title": "t", "text": "x"}], "chat_template": "{{ messages }}", "mm_processor_kwargs": {"a": 1},
    "priority": 1, "logits_processors": ["x"], "return_tokens_as_token_ids": True, "return_token_ids": True,
    "cache_salt": "salt", "kv_transfer_params": {"a": 1}, "vllm_xargs": {"a": 1}, "request_id": "mine",
}
REFUSED = [(f.name, kind) for f in FIELDS if f.status == "refused" for kind in f.kinds]


@pytest.fixture(scope="module")
def client(features):
    return openai.OpenAI(base_url=features.base + "/v1", api_key=KEYS[0], max_retries=0, timeout=180)


def test_every_refused_field_has_a_sample():
    assert {name for name, _ in REFUSED} == set(REFUSED_SAMPLES)


@pytest.mark.parametrize("name,kind", REFUSED)
def test_refused_fields_are_400_naming_them(client, name, kind):
    with pytest.raises(openai.BadRequestError) as e:
        if kind == "chat":
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                           extra_body={name: REFUSED_SAMPLES[name]})
        else:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_body={name: REFUSED_SAMPLES[name]})
    assert e.value.body["param"] == name and e.value.body["code"] == "unsupported_parameter"


def test_image_parts_are_refused(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}])
    assert e.value.body["param"] == "messages" and "image_url" in e.value.body["message"]


def test_logit_bias_forces_and_bans_tokens(client, tokenizer):
    banana = tokenizer.encode(" banana", add_special_tokens=False)[0]
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0,
                                  logit_bias={str(banana): 100})
    assert r.choices[0].text == " banana" * 4
    s = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=1.0, seed=3,
                                  logit_bias={str(banana): 100}, stream=True)
    assert "".join(c.choices[0].text for c in s) == " banana" * 4
    base = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0,
                                     logprobs=0)
    first = tokenizer.encode(base.choices[0].logprobs.tokens[0], add_special_tokens=False)[0]
    banned = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0,
                                       logit_bias={str(first): -100}, logprobs=0)
    assert banned.choices[0].logprobs.tokens[0] != base.choices[0].logprobs.tokens[0]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, logit_bias={"10000000": 5})


def test_echo_with_prompt_logprobs(client, tokenizer):
    prompt = "The three primary colors are"
    ids = tokenizer.encode(prompt)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, echo=True, logprobs=2)
    c = r.choices[0]
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0).choices[0].text
    assert c.text == prompt + plain
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) + r.usage.completion_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and all(len(t) >= 1 for t in lp.top_logprobs[1:])
    assert "".join(lp.tokens) == c.text and lp.text_offset[len(ids)] == len(prompt)
    s = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, echo=True, stream=True))
    assert s[0].choices[0].text.startswith(prompt) and "".join(x.choices[0].text for x in s) == c.text
    chat = client.chat.completions.create(model=MODEL, max_tokens=6, temperature=0,
                                          messages=[{"role": "user", "content": "Name a color."},
                                                    {"role": "assistant", "content": "My favourite color is"}],
                                          extra_body={"echo": True, "continue_final_message": True,
                                                      "add_generation_prompt": False})
    assert chat.choices[0].message.content.startswith("My favourite color is")
    vllm = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, extra_body={"prompt_logprobs": 1})
    plps = vllm.choices[0].model_extra["prompt_logprobs"]
    assert plps[0] is None and len(plps) == len(ids) and str(ids[1]) in plps[1]


def test_stop_token_ids_and_continuous_usage(client, features, tokenizer):
    q = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    with InferenceClient(f"127.0.0.1:{features.grpc_port}", api_key=KEYS[0], timeout=120) as g:
        ids = collect(g.chat(q, model=MODEL, max_tokens=30, temperature=0)).token_ids
    stop_id = ids[2]
    upto = ids.index(stop_id)
    r = client.chat.completions.create(model=MODEL, messages=q, max_tokens=30, temperature=0,
                                       extra_body={"stop_token_ids": [stop_id]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == upto + 1
    assert r.choices[0].message.content == tokenizer.decode(ids[:upto])  # the stop token is not in the text
    chunks = list(client.chat.completions.create(model=MODEL, messages=q, max_tokens=12, temperature=0, stream=True,
                                                 stream_options={"include_usage": True, "continuous_usage_stats": True},
                                                 user="someone", extra_body={"ignore_eos": True}))
    used = [c.usage.completion_tokens for c in chunks]
    assert all(c.usage is not None for c in chunks) and used == sorted(used) and used[-1] == 12


def test_generation_config_eos_and_default_max_tokens(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
                                       temperature=0, max_tokens=30, logprobs=True)
    # ' Paris' is an EOS id of this model's generation_config.json: the decode worker stops there
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == "The capital of France is"
    assert r.choices[0].logprobs.content[-1].token == " Paris" and r.usage.completion_tokens == 6
    c = client.completions.create(model=MODEL, prompt="Paris", temperature=0, extra_body={"ignore_eos": True})
    assert c.usage.completion_tokens == 48 and c.choices[0].finish_reason == "length"  # max_new_tokens, not 16
    assert EXTRA_EOS == 7042


def test_routes(client, features):
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    for method, path, status in (("GET", "/v1/no/such/route", 404), ("GET", "/v1/chat/completions", 405),
                                 ("DELETE", "/v1/models", 405), ("POST", "/v1/embeddings", 404)):
        r = httpx.request(method, features.base + path, headers=AUTH, timeout=10)
        assert r.status_code == status and r.headers["content-type"] == "application/json", (path, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"} and r.headers["x-request-id"]
    with pytest.raises(openai.NotFoundError) as e:
        client.post("/embeddings", body={"input": "x"}, cast_to=object)
    assert "no route" in str(e.value)
    assert httpx.get(features.base + "/version", timeout=10).json()["version"]
    out = subprocess.run([sys.executable, "-m", "services.cli", "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("pdmesh ")
    tok = httpx.post(features.base + "/tokenize", json={"prompt": "Hello world"}, headers=AUTH, timeout=10).json()
    assert tok["count"] == len(tok["tokens"]) > 0
    back = httpx.post(features.base + "/detokenize", json={"tokens": tok["tokens"]}, headers=AUTH, timeout=10).json()
    assert back["prompt"].endswith("Hello world")
    assert httpx.post(features.base + "/detokenize", json={"tokens": [-1]}, headers=AUTH, timeout=10).status_code == 400
    metrics = httpx.get(features.base + "/metrics", headers=AUTH, timeout=10)
    assert metrics.status_code == 200 and "pdmesh:requests_received_total" in metrics.text


def test_several_api_keys(features):
    for key in KEYS:
        ok = openai.OpenAI(base_url=features.base + "/v1", api_key=key, max_retries=0, timeout=60)
        assert ok.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2).choices
    for key in ("wrong", ""):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=features.base + "/v1", api_key=key or "x", max_retries=0).models.list()
    assert httpx.get(features.base + "/v1/models", timeout=10).status_code == 401
    assert httpx.get(features.base + "/health", timeout=10).status_code == 200  # public
    with InferenceClient(f"127.0.0.1:{features.grpc_port}", api_key=KEYS[3], timeout=60) as g:
        assert collect(g.generate("Hi", model=MODEL, max_tokens=2)).usage.completion_tokens == 2
    with InferenceClient(f"127.0.0.1:{features.grpc_port}", api_key="wrong", timeout=60) as g:
        with pytest.raises(grpc.RpcError) as e:
            g.list_models()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_tls_on_http_and_grpc(tmp_path, features):
    certs = make_certs(tmp_path)
    port, gport = free_port(), free_port()
    template = tmp_path / "template.jinja"  # --chat-template replaces the tokenizer's
    template.write_text("{% for m in messages %}<<{{ m.role }}>> {{ m.content }}\n{% endfor %}"
                        "{% if add_generation_prompt %}<<assistant>>{% endif %}")
    proc = Proc([sys.executable, "-m", "services.gateway", "--host", "127.0.0.1", "--port", str(port),
                 "--grpc-port", str(gport), "--metrics-port", "-1", "--scheduler", features.scheduler,
                 "--chat-template", str(template), "--mesh-secret-file", mesh_secret_file(tmp_path),
                 "--ssl-certfile", certs["cert.pem"], "--ssl-keyfile", certs["key.pem"]], tmp_path / "tls-gateway.log")
    try:
        proc.wait_log("READY gateway https://")
        base = f"https://127.0.0.1:{port}"
        http = httpx.Client(verify=certs["ca.pem"], timeout=120)
        deadline = time.monotonic() + 30
        while http.get(base + "/health").status_code != 200:  # until it has seen the workers
            assert time.monotonic() < deadline, proc.tail()
            time.sleep(0.2)
        tls = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, http_client=http)
        r = tls.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert r.usage.completion_tokens == 3
        ids = http.post(base + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()["tokens"]
        assert http.post(base + "/detokenize", json={"tokens": ids}).json()["prompt"] == "<<user>> hi\n<<assistant>>"
        assert r.usage.prompt_tokens == len(ids)
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)  # plaintext is not served
        with InferenceClient(f"localhost:{gport}", timeout=60, root_certificates=open(certs["ca.pem"], "rb").read()) as g:
            assert collect(g.generate("Hi", model=MODEL, max_tokens=2)).usage.completion_tokens == 2
    finally:
        assert proc.stop() == 0


def test_access_log_has_a_line_per_request_and_no_text(client, features):
    secret = "zebra-quartz-7781"
    r = client.chat.completions.with_raw_response.create(model=MODEL, messages=[{"role": "user", "content": secret}],
                                                         max_tokens=2)
    rid = r.headers["x-request-id"]
    log = features.procs["gateway"]
    log.wait_log(f"id={rid}", timeout=10)
    line = next(ln for ln in log.log_path.read_text().splitlines() if f"id={rid}" in ln)
    assert "pdmesh.access" in line and "POST /v1/chat/completions 200" in line
    with InferenceClient(f"127.0.0.1:{features.grpc_port}", api_key=KEYS[0], timeout=60) as g:
        grpc_rid = collect_rid(g.generate(secret, model=MODEL, max_tokens=2))
    log.wait_log("gRPC /pdmesh.v1.Inference/Generate OK", timeout=10)
    assert f"id={grpc_rid}" in log.log_path.read_text()
    assert secret not in log.log_path.read_text()
    wait_http(features.base + "/health", log)


def collect_rid(messages) -> str:
    return [m.request_id for m in messages][-1]
