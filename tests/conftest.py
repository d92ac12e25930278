"""Shared fixtures. The embedded model is dequantized once (cached as safetensors under
PDMESH_CACHE_DIR) and reused by every test and every mesh process."""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    """Options of the fault suite (tests/faults), declared here so that any run accepts them."""
    parser.addoption("--soak-seconds", type=float, default=45.0, help="length of the fault suite's soak run")
    parser.addoption("--fault-report", default=None,
                     help="where the fault suite writes its figures (default: the run's temporary directory)")
    parser.addoption("--security-report", default=None,
                     help="where the security suite (tests/security) writes its figures (default: the run's temporary directory)")
    parser.addoption(
        "--deploy", choices=("auto", "require"), default="auto",
        help="tests/deploy (builds the CPU image and runs the compose stack with podman): 'auto' skips it, "
             "naming what is missing, on a host without podman & co; 'require' fails instead (.ci/run sets it "
             "through PYTEST_ADDOPTS, after installing them)")


@pytest.fixture(scope="session")
def embedded_dir():
    from pdmesh.models.loader import embedded_gguf_path, gguf_to_hf_dir

    return gguf_to_hf_dir(embedded_gguf_path())


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from pdmesh.tokenizer import Tokenizer

    return Tokenizer(str(embedded_dir))


@pytest.fixture(scope="session")
def smol_hf():
    """transformers' own model, dequantized from the same GGUF file (the reference)."""
    import torch
    from transformers import AutoModelForCausalLM

    from pdmesh.models.loader import embedded_gguf_path

    gguf = embedded_gguf_path()
    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
