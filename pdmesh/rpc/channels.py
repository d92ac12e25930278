"""One cached ``grpc.aio`` channel per peer address; every call on it carries this process's
credentials (``pdmesh.rpc.auth``)."""

from __future__ import annotations

from typing import Any, Callable, Optional, TypeVar

import grpc

from pdmesh.rpc.auth import BaseAuthenticator
from pdmesh.rpc.server import CHANNEL_OPTIONS
from pdmesh.rpc.tls import PLAINTEXT, TlsConfig

S = TypeVar("S")


def open_channel(address: str, tls: TlsConfig = PLAINTEXT, auth: Optional[BaseAuthenticator] = None) -> Any:
    """A ``grpc.aio`` channel to a mesh peer, over TLS when ``tls`` is enabled; with ``auth``, every
    call made on it carries ``auth.metadata(method)``."""
    if tls.enabled:
        ch = grpc.aio.secure_channel(address, tls.channel_credentials(), options=CHANNEL_OPTIONS + tls.channel_options())
    else:
        ch = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    return ch if auth is None else AuthedChannel(ch, auth)


class AuthedChannel:
    """A ``grpc.aio.Channel`` whose calls carry credentials: the stubs' multicallables are wrapped
    so that each call adds ``auth.metadata(method)`` to its metadata (a fresh token per call; no
    per-message cost).  Everything else is the channel's own."""

    def __init__(self, channel: grpc.aio.Channel, auth: BaseAuthenticator) -> None:
        self._channel = channel
        self._auth = auth

    def _wrap(self, kind: str, method, *args, **kwargs) -> "_Credentialed":
        name = method.decode() if isinstance(method, bytes) else method
        return _Credentialed(getattr(self._channel, kind)(method, *args, **kwargs), name, self._auth)

    def unary_unary(self, method, *args, **kwargs):
        return self._wrap("unary_unary", method, *args, **kwargs)

    def unary_stream(self, method, *args, **kwargs):
        return self._wrap("unary_stream", method, *args, **kwargs)

    def stream_unary(self, method, *args, **kwargs):
        return self._wrap("stream_unary", method, *args, **kwargs)

    def stream_stream(self, method, *args, **kwargs):
        return self._wrap("stream_stream", method, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._channel, name)

    async def __aenter__(self) -> "AuthedChannel":
        return self

    async def __aexit__(self, *exc) -> None:
        await self._channel.close()


class _Credentialed:
    def __init__(self, multicallable, method: str, auth: BaseAuthenticator) -> None:
        self._mc, self._method, self._auth = multicallable, method, auth

    def __call__(self, *args, metadata=None, **kwargs):
        return self._mc(*args, metadata=tuple(metadata or ()) + self._auth.metadata(self._method), **kwargs)


class ChannelPool:
    def __init__(self, tls: Optional[TlsConfig] = None, auth: Optional[BaseAuthenticator] = None) -> None:
        self.tls = tls or PLAINTEXT
        self.auth = auth
        """Credentials of this process's calls (None: none sent)."""
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[tuple[str, type], object] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = open_channel(address, self.tls, self.auth)
        return ch

    def stub(self, address: str, stub_cls: Callable[[grpc.aio.Channel], S]) -> S:
        key = (address, stub_cls)  # type: ignore[assignment]
        s = self._stubs.get(key)
        if s is None:
            s = self._stubs[key] = stub_cls(self.channel(address))
        return s  # type: ignore[return-value]

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
        self._stubs.clear()
