"""``pdmesh decode`` / ``python -m services.decode``."""

from __future__ import annotations

from typing import Optional

from pdmesh.worker import worker_main


def main(argv: Optional[list[str]] = None) -> None:
    from services.decode.server import serve

    worker_main("decode", 50071, serve, argv)


if __name__ == "__main__":
    main()
