"""Logging setup shared by every service."""

from __future__ import annotations

import faulthandler
import logging
import sys
import time
from pathlib import Path
from typing import Hashable

from pdmesh.env import ENV


def configure_logging(service: str) -> None:
    """Log lines tagged with ``service`` and its pid; a crash in native code (SIGSEGV, SIGABRT)
    prints every thread's Python stack to stderr before the process dies."""
    faulthandler.enable(file=sys.stderr, all_threads=True)
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


class RateLimitedLog:
    """At most one warning per key every ``every`` seconds, saying how many were left out since the
    last one (an attack or a storm of refusals must not flood the log, nor go unlogged)."""

    def __init__(self, logger: logging.Logger, every: float = 5.0) -> None:
        self.logger = logger
        self.every = every
        self._last: dict[Hashable, list] = {}

    def warning(self, key: Hashable, msg: str, *args) -> None:
        now = time.monotonic()
        slot = self._last.setdefault(key, [float("-inf"), 0])
        if now - slot[0] < self.every:
            slot[1] += 1
            return
        more = f" (and {slot[1]} more like it since the last report)" if slot[1] else ""
        self.logger.warning(msg + more, *args)
        slot[0], slot[1] = now, 0
