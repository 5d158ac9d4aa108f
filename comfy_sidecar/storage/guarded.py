"""The SSRF guard's httpx side: a transport whose every connection passes a :class:`NetGuard`.

Its own module so that httpcore (with h11 and certifi, about 3 MB of a sidecar's RSS) is
imported by the first client that needs it, not at start-up: callers import this module inside
the function that builds their client (the webhook dispatcher, the HTTP storage backend).
See :mod:`comfy_sidecar.storage.netguard` for what is checked and how proxies are treated.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable

import httpcore
import httpx

from comfy_sidecar.storage.errors import URLRefused
from comfy_sidecar.storage.netguard import (
    DEFAULT_PORTS,
    NetGuard,
    is_trusted,
    proxy_for,
    tls_context,
)

__all__ = ["guarded_transport"]


def guarded_transport(guard: NetGuard, **kwargs: object) -> httpx.AsyncBaseTransport:
    """The httpx transport for callers' URLs (``kwargs``: :class:`httpx.AsyncHTTPTransport`'s,
    e.g. ``limits``). A request :func:`~comfy_sidecar.storage.netguard.proxy_for` gives a proxy
    goes through that proxy after :meth:`NetGuard.check_host` (``proxied``) passed its host;
    any other goes out directly, each new connection checked and pinned. A client built on it
    reads no proxy settings of its own (httpx mounts none when given a transport). Inside
    :func:`~comfy_sidecar.storage.netguard.trusted` nothing is checked. ``send`` raises
    :class:`URLRefused`."""
    kwargs.setdefault("verify", tls_context())
    return _GuardedTransport(guard, _pinned(guard, **kwargs), kwargs)


def _pinned(guard: NetGuard, **kwargs: object) -> httpx.AsyncHTTPTransport:
    """A direct httpx transport whose every new connection is checked and pinned, with the
    shared :func:`~comfy_sidecar.storage.netguard.tls_context`."""
    kwargs.setdefault("verify", tls_context())
    transport = httpx.AsyncHTTPTransport(**kwargs)  # type: ignore[arg-type]
    pool = transport._pool
    # httpx has no public hook for the network backend; the pool it builds is
    # httpcore's, which takes one (httpcore's documented extension point).
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=pool._ssl_context or ssl.create_default_context(),
        max_connections=pool._max_connections,
        max_keepalive_connections=pool._max_keepalive_connections,
        keepalive_expiry=pool._keepalive_expiry,
        http1=pool._http1,
        http2=pool._http2,
        retries=pool._retries,
        network_backend=_GuardedBackend(guard),
    )
    return transport


class _GuardedTransport(httpx.AsyncBaseTransport):
    """:func:`guarded_transport`: each request (one hop: redirects, whether followed by hand or
    by httpx, are requests of their own) goes through the proxy ``proxy_for`` gives it, after
    :meth:`NetGuard.check_host`, or to the pinned direct transport."""

    def __init__(
        self, guard: NetGuard, direct: httpx.AsyncHTTPTransport, kwargs: dict[str, object]
    ) -> None:
        self._guard = guard
        self._direct = direct
        self._kwargs = kwargs
        self._proxied: dict[str, httpx.AsyncHTTPTransport] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        host = url.raw_host.decode("ascii")  # as the proxy gets it (IDNA-encoded)
        proxy = proxy_for(url.scheme, host)
        if proxy is None:
            return await self._direct.handle_async_request(request)
        if not is_trusted():
            port = url.port or DEFAULT_PORTS.get(url.scheme, 80)
            await self._guard.check_host(host, port, proxied=True)
        return await self._through(proxy).handle_async_request(request)

    def _through(self, proxy: str) -> httpx.AsyncHTTPTransport:
        """The transport through ``proxy`` (made once; its own connection is not checked)."""
        transport = self._proxied.get(proxy)
        if transport is None:
            try:
                transport = httpx.AsyncHTTPTransport(proxy=proxy, **self._kwargs)  # type: ignore[arg-type]
            except (ImportError, ValueError) as exc:  # a bad or unsupported proxy URL
                raise httpx.ProxyError(f"cannot use the proxy: {exc}") from None
            self._proxied[proxy] = transport
        return transport

    async def aclose(self) -> None:
        transports = [self._direct, *self._proxied.values()]
        self._proxied.clear()
        for transport in transports:
            await transport.aclose()


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore network backend: resolve and check the host, connect to the checked address."""

    def __init__(self, guard: NetGuard) -> None:
        self._guard = guard
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        address = host if is_trusted() else await self._guard.aresolve(host, port)
        return await self._inner.connect_tcp(address, port, timeout, local_address, socket_options)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise URLRefused("URL refused: unix sockets are not allowed")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)
