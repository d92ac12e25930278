"""``pdmesh scheduler`` / ``python -m services.scheduler``."""

from __future__ import annotations

import sys
from typing import Optional

from pdmesh.config import from_flags
from pdmesh.log import configure_logging, run_async


def main(argv: Optional[list[str]] = None) -> None:
    configure_logging("scheduler")
    from services.scheduler.server import SchedulerServiceConfig, parser, serve

    from pdmesh.rpc.auth import InternalAuthConfig
    from pdmesh.rpc.tls import TlsConfig
    from pdmesh.telemetry import TracingConfig

    ns = parser().parse_args(argv)
    cfg, tcfg, tls = from_flags(SchedulerServiceConfig, ns), from_flags(TracingConfig, ns), from_flags(TlsConfig, ns)
    acfg = from_flags(InternalAuthConfig, ns)
    run_async(lambda: serve(cfg, tcfg, tls, acfg))


if __name__ == "__main__":
    main(sys.argv[1:])
