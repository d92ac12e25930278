"""One cached ``grpc.aio`` channel per peer address, and per-call deadlines."""

from __future__ import annotations

from typing import Callable, Optional, TypeVar, cast

import grpc

from pdmesh.rpc.server import CHANNEL_OPTIONS
from pdmesh.rpc.tls import PLAINTEXT, TlsConfig

S = TypeVar("S")


def open_channel(address: str, tls: TlsConfig = PLAINTEXT) -> grpc.aio.Channel:
    """A ``grpc.aio`` channel to a mesh peer, over TLS when ``tls`` is enabled."""
    if tls.enabled:
        return grpc.aio.secure_channel(address, tls.channel_credentials(), options=CHANNEL_OPTIONS + tls.channel_options())
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


class ChannelPool:
    def __init__(self, tls: Optional[TlsConfig] = None) -> None:
        self.tls = tls or PLAINTEXT
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[tuple[str, Callable[[grpc.aio.Channel], object]], object] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = open_channel(address, self.tls)
        return ch

    def stub(self, address: str, stub_cls: Callable[[grpc.aio.Channel], S]) -> S:
        key = (address, stub_cls)
        s = self._stubs.get(key)
        if s is None:
            s = self._stubs[key] = stub_cls(self.channel(address))
        return cast(S, s)  # stored under this stub_cls: built by it

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
        self._stubs.clear()
