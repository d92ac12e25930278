"""``pdmesh bench``: the serving benchmark of the source deployments (vLLM's method and metric
definitions) against any OpenAI-compatible endpoint."""
