"""One cached ``grpc.aio`` channel per peer address; every call on it carries this process's
credentials (``pdmesh.rpc.auth``)."""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Optional, TypeVar, cast

import grpc

from pdmesh.rpc.auth import BaseAuthenticator
from pdmesh.rpc.server import CHANNEL_OPTIONS
from pdmesh.rpc.tls import PLAINTEXT, TlsConfig

S = TypeVar("S")


def open_channel(address: str, tls: TlsConfig = PLAINTEXT, auth: Optional[BaseAuthenticator] = None,
                 options: Optional[list] = None) -> Any:
    """A ``grpc.aio`` channel to a mesh peer, over TLS when ``tls`` is enabled; with ``auth``, every
    call made on it carries ``auth.metadata(method)``. ``options``: instead of ``CHANNEL_OPTIONS``."""
    opts = list(options if options is not None else CHANNEL_OPTIONS)
    if tls.enabled:
        ch = grpc.aio.secure_channel(address, tls.channel_credentials(), options=opts + tls.channel_options())
    else:
        ch = grpc.aio.insecure_channel(address, options=opts)
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
    """Channels by peer address, at most ``max_channels`` (more than the scheduler's --max-workers:
    the least recently used beyond it are closed after a grace period for their calls in flight).
    A decode worker dials only the prefill workers the scheduler lists (``pdmesh.rpc.peers``), so no
    descriptor can grow it."""

    def __init__(self, tls: Optional[TlsConfig] = None, auth: Optional[BaseAuthenticator] = None,
                 max_channels: int = 2048, close_grace: float = 30.0, options: Optional[list] = None) -> None:
        self.tls = tls or PLAINTEXT
        self.options = options
        """gRPC channel options (None: ``CHANNEL_OPTIONS``)."""
        self.auth = auth
        """Credentials of this process's calls (None: none sent)."""
        self.max_channels = max_channels
        self.close_grace = close_grace
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[tuple[str, Callable[[grpc.aio.Channel], object]], object] = {}
        self._closing: set[asyncio.Task] = set()

    def channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.pop(address, None)
        if ch is None:
            ch = open_channel(address, self.tls, self.auth, self.options)
            while len(self._channels) >= self.max_channels:
                self._evict(next(iter(self._channels)))
        self._channels[address] = ch  # most recently used last
        return ch

    def _evict(self, address: str) -> None:
        ch = self._channels.pop(address)
        for key in [k for k in self._stubs if k[0] == address]:
            del self._stubs[key]
        task = asyncio.ensure_future(ch.close(self.close_grace))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @property
    def size(self) -> int:
        """Channels open (not counting ones closing)."""
        return len(self._channels)

    def stub(self, address: str, stub_cls: Callable[[grpc.aio.Channel], S]) -> S:
        key = (address, stub_cls)
        ch = self.channel(address)
        s = self._stubs.get(key)
        if s is None:
            s = self._stubs[key] = stub_cls(ch)
        return cast(S, s)  # stored under this stub_cls: built by it

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        await asyncio.gather(*self._closing, return_exceptions=True)
        self._channels.clear()
        self._stubs.clear()
