"""``pdmesh scheduler`` / ``python -m services.scheduler``."""

from __future__ import annotations

import sys
from typing import Optional

from pdmesh.config import from_flags
from pdmesh.log import configure_logging, run_async


def main(argv: Optional[list[str]] = None) -> None:
    configure_logging("scheduler")
    from services.scheduler.server import SchedulerServiceConfig, parser, serve

    cfg = from_flags(SchedulerServiceConfig, parser().parse_args(argv))
    run_async(lambda: serve(cfg))


if __name__ == "__main__":
    main(sys.argv[1:])
