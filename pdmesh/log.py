"""Logging setup shared by every service."""

from __future__ import annotations

import logging
import sys

from pdmesh.env import ENV


def configure_logging(service: str) -> None:
    logging.basicConfig(
        level=ENV.LOG_LEVEL.get().upper(),
        format=f"%(asctime)s %(levelname)s {service}[%(process)d] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "httpcore", "transformers", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_async(main) -> None:
    """Run ``main()`` on uvloop when available."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        import asyncio

        asyncio.run(main())
    else:
        uvloop.run(main())
