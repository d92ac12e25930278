"""``pdmesh prefill`` / ``python -m services.prefill``."""

from __future__ import annotations

from typing import Optional

from pdmesh.worker import worker_main


def main(argv: Optional[list[str]] = None) -> None:
    from services.prefill.server import serve

    worker_main("prefill", 50061, serve, argv)


if __name__ == "__main__":
    main()
