"""``pdmesh both`` / ``python -m services.decode.both``: a colocated worker (ROLE_BOTH) — one
engine computes each prompt and decodes it, as a non-disaggregated server does; the scheduler
routes whole requests to it (see ``pdmesh.routing``)."""

from __future__ import annotations

from typing import Optional

from pdmesh.worker import worker_main


def main(argv: Optional[list[str]] = None) -> None:
    from services.decode.server import serve_colocated

    worker_main("both", 50081, serve_colocated, argv)


if __name__ == "__main__":
    main()
