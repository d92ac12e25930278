"""Logging setup shared by every service."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from pdmesh.env import ENV


def configure_logging(service: str) -> None:
    logging.basicConfig(
        level=ENV.LOG_LEVEL.get().upper(),
        format=f"%(asctime)s %(levelname)s {service}[%(process)d] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "httpcore", "transformers", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class StartupError(RuntimeError):
    """A service cannot start for a reason its user can fix (a port in use, a missing file); the
    message names the flag. ``run_async`` prints it as one line and exits with status 2."""


def run_async(main) -> None:
    """Run ``main()`` on uvloop when available; a ``StartupError`` becomes one line on stderr and
    exit status 2 instead of a traceback."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        import asyncio

        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(main())
    except StartupError as exc:
        logging.getLogger("startup").debug("start-up failed", exc_info=True)
        print(f"{Path(sys.argv[0]).name}: {exc}", file=sys.stderr)
        sys.exit(2)
