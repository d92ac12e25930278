"""``pdmesh gateway`` / ``python -m services.gateway``.

Lifecycle: load the tokenizer (no weights) and the model's generation defaults, start uvicorn
(uvloop; TLS with --ssl-certfile) on --port and the gRPC API on --grpc-port, watch the scheduler
for workers (``/health`` is 200 only while a prefill and a decode worker are routable), serve;
on SIGTERM: ``/health`` turns 503, new requests get 503, in-flight streams finish within
--drain-timeout, then exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from pathlib import Path
from typing import Iterator, Optional

from pdmesh.log import StartupError, configure_logging, run_async
from pdmesh.models.loader import resolve
from pdmesh.rpc.auth import Identity, build_authenticator
from pdmesh.rpc.server import ignore_further_signals
from pdmesh.telemetry import Telemetry
from pdmesh.tokenizer import Tokenizer

log = logging.getLogger("gateway")


async def serve(argv: Optional[list[str]]) -> None:
    import uvicorn

    from services.gateway.app import build_app
    from services.gateway.config import build
    from services.gateway.core import Gateway
    from services.gateway.front_door import FrontDoor, connection_budget

    cfg, mcfg, tcfg, tls, acfg = build(argv)
    auth = build_authenticator(acfg, tls, "gateway", lambda: Identity("gateway", f"gateway@{socket.gethostname()}:{cfg.port}"))
    res = await asyncio.to_thread(resolve, mcfg)
    template = Path(cfg.chat_template).read_text() if cfg.chat_template else None
    tok = await asyncio.to_thread(Tokenizer, res.tokenizer_path, template)
    max_len = mcfg.max_model_len or res.arch.max_position_embeddings
    gw = Gateway(cfg, tok, res.served_name, max_len, Telemetry(tcfg, "gateway"), tls, res.generation, auth)
    door = FrontDoor(connection_budget(cfg.max_connections), cfg.header_timeout, gw.metrics)

    class _Server(uvicorn.Server):
        # Signals are ours (drain first: /health 503 and new requests 503 while in-flight ones finish,
        # then stop listening); uvicorn would otherwise close the listener at the first SIGTERM.
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    server = _Server(uvicorn.Config(build_app(gw), host=cfg.host, port=cfg.port, log_level="warning",
                                    loop="none", lifespan="on", timeout_graceful_shutdown=30, access_log=False,
                                    ssl_certfile=cfg.ssl_certfile, ssl_keyfile=cfg.ssl_keyfile, http=door.protocol()))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if task.done():
        await task
        raise StartupError(f"cannot listen on {cfg.host}:{cfg.port} (--port): the port is in use or the address is not this host's")
    grpc_server = grpc_health = None
    if cfg.grpc_port >= 0:
        from services.gateway.grpc_api import start_grpc_api

        grpc_server, grpc_health = await start_grpc_api(gw, cfg.host, cfg.grpc_port, cfg.ssl_certfile, cfg.ssl_keyfile)

        async def follow_readiness() -> None:
            while True:
                await grpc_health.set_serving(gw.ready and not gw.draining)
                await asyncio.sleep(0.5)

        readiness = asyncio.create_task(follow_readiness())
    scheme = "https" if cfg.ssl_certfile else "http"
    listeners = [f"grpc={cfg.host}:{cfg.grpc_port}" if cfg.grpc_port >= 0 else "",
                 f"metrics={gw.metrics.port}" if cfg.metrics_port >= 0 else ""]
    print(" ".join(["READY gateway", f"{scheme}://{cfg.host}:{cfg.port}", *filter(None, listeners)]), flush=True)
    await stop.wait()
    ignore_further_signals()
    log.info("draining: refusing new requests, %d in flight", gw.inflight)
    gw.draining = True
    if grpc_health is not None:
        readiness.cancel()
        await grpc_health.set_serving(False)
    deadline = loop.time() + cfg.drain_timeout
    while gw.inflight and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if grpc_server is not None:
        await grpc_server.stop(grace=1.0)
    server.should_exit = True
    await task


def main(argv: Optional[list[str]] = None) -> None:
    configure_logging("gateway")
    run_async(lambda: serve(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    main()
