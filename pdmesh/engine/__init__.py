"""The engine: sequences, sampler, in-worker scheduler, model runner, ``LLMEngine`` and ``LLM``."""

from pdmesh.engine.engine import LLMEngine, RemoteAdmission, RequestRejected
from pdmesh.engine.llm import LLM, Completion, GenerationResult
from pdmesh.engine.sequence import RequestOutput, SamplingParams, TokenLogprob

__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "TokenLogprob", "Completion",
           "GenerationResult", "RemoteAdmission", "RequestRejected"]
