"""pdmesh: the shared library behind the gateway, scheduler, prefill and decode services.

The library never imports a service.  Its parts:

- ``pdmesh.config``      frozen, validated configuration dataclasses built from CLI flags
- ``pdmesh.env``         the one module that reads environment variables
- ``pdmesh.models``      model families (Llama, Qwen2, Qwen3) and weight loading
- ``pdmesh.kv``          paged KV block allocator with prefix caching, and the KV tensor pool
- ``pdmesh.attention``   attention backends (plan once per batch, run per layer)
- ``pdmesh.engine``      sequences, sampler, in-worker scheduler, model runner, engine, ``LLM``
- ``pdmesh.tokenizer``   tokenizer, chat template, incremental detokenization, stop strings
- ``pdmesh.transport``   KV transports between prefill and decode workers
- ``pdmesh.openai``      OpenAI request validation and response shapes
- ``pdmesh.rpc``         gRPC helpers (deadlines, metadata, channels)
- ``pdmesh.v1``          generated protobuf/gRPC code for ``protos/pdmesh/v1`` (never edited by hand)
"""

__version__ = "0.1.0"
