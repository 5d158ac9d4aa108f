"""The SSRF guard: which addresses a caller's URL may reach.

Every URL a caller supplies (media and model inputs, ``POST /download``, upload targets, webhook
URLs, the job adapters' media and webhook URLs) is checked here; operator URLs
(``AWS_ENDPOINT_URL``, ``HF_ENDPOINT``, Azure endpoints, ``WARMUP_PROMPT_URL``, manifest URLs,
``SYSTEM_WEBHOOK_URL``) are not (run them inside :func:`trusted`).

Refused by default: loopback, link-local (169.254.0.0/16, fe80::/10), private (RFC 1918,
fc00::/7), shared (100.64.0.0/10), multicast, unspecified and every other non-global address,
also inside IPv4-mapped, 6to4, Teredo, NAT64 and IPv4-compatible IPv6 forms; and, on any local
address, the sidecar's own ``PORT`` and ComfyUI's port — even when allowed otherwise.
``ALLOWED_URL_HOSTS`` (host globs, CIDRs) and ``ALLOW_PRIVATE_URLS`` open non-global addresses.

A host name is resolved once with the system resolver (``socket.getaddrinfo``, off the event
loop), every address is checked, and the connection goes to the checked address (DNS rebinding
cannot slip a second answer in): :meth:`NetGuard.connect_address` for sockets opened by hand,
:func:`comfy_sidecar.storage.guarded.guarded_transport` for httpx (a network backend that
checks at connect time, so every redirect hop and every new connection is checked; TLS SNI and
``Host`` keep the name).

Through a forward proxy (``HTTP_PROXY``/``HTTPS_PROXY``/``ALL_PROXY`` apply to the URL and
``NO_PROXY`` does not exempt its host: :func:`proxy_for`) the proxy resolves the name, so the
address cannot be pinned. Each request (first hop and every redirect) is then checked by its
host before the proxy is asked (:meth:`NetGuard.check_host` with ``proxied``): an IP literal as
an address; a name resolved here and every address checked as above; a name that does not
resolve here (only the proxy knows it) is refused unless it matches ``ALLOWED_URL_HOSTS``, and
an allowed name goes to the proxy without being resolved. The proxy may still resolve a checked
name to another address than we did: list the hosts that go through a proxy in
``ALLOWED_URL_HOSTS`` where that matters. The connection to the proxy itself is not checked
(the operator chose it). :func:`~comfy_sidecar.storage.guarded.guarded_transport` carries
both kinds of request, so no httpx
caller can send a caller's URL through the proxy unchecked.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import ipaddress
import socket
import ssl
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from comfy_sidecar.errors import InputError
from comfy_sidecar.storage.errors import URLRefused
from comfy_sidecar.storage.globs import host_matches

if TYPE_CHECKING:
    from comfy_sidecar.config import Settings

__all__ = ["NetGuard", "URLRefused", "proxy_for", "trusted"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Schemes a caller's URL may have (the hf and Azure forms are https URLs).
SCHEMES = ("http", "https", "s3")
_SHARED = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_COMPAT = ipaddress.ip_network("::/96")
DEFAULT_PORTS = {"http": 80, "https": 443}

_TRUSTED: contextvars.ContextVar[bool] = contextvars.ContextVar("netguard_trusted", default=False)


@contextlib.contextmanager
def trusted() -> Iterator[None]:
    """Inside this block (and tasks it creates) connections are not checked: for the
    operator's own URLs (manifest, warmup prompt, system webhook)."""
    token = _TRUSTED.set(True)
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def is_trusted() -> bool:
    """True inside :func:`trusted`."""
    return _TRUSTED.get()


def proxy_for(scheme: str, host: str) -> str | None:
    """The forward proxy a request to ``scheme://host`` goes through: ``<SCHEME>_PROXY``, else
    ``ALL_PROXY`` (lower-case names first, read from the environment at each call, as urllib
    does), None when neither is set or ``NO_PROXY`` exempts ``host`` (exact names and domain
    suffixes, ``*`` for all). A value without a scheme is taken as ``http://``."""
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(scheme.lower()) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(host):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


def embedded(ip: IPAddress) -> list[IPAddress]:
    """Every IPv4 address carried inside ``ip`` (IPv4-mapped, 6to4, Teredo server and client,
    NAT64, IPv4-compatible), then ``ip`` itself."""
    found: list[IPAddress] = []
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            found.append(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            found.append(ip.sixtofour)
        if ip.teredo is not None:
            found.extend(ip.teredo)
        if any(ip in net for net in _NAT64) or (ip in _COMPAT and int(ip) > 1):
            found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    found.append(ip)
    return found


def address_problem(ip: IPAddress) -> str | None:
    """Why ``ip`` (or an address embedded in it) is not a public address, or None."""
    for one in embedded(ip):
        if one.is_unspecified:
            return f"{ip} is an unspecified address"
        if one.is_loopback:
            return f"{ip} is a loopback address"
        if one.is_link_local:
            return f"{ip} is a link-local address"
        if one.is_multicast:
            return f"{ip} is a multicast address"
        if one in _SHARED:
            return f"{ip} is in the shared address space 100.64.0.0/10"
        if one.is_private:
            return f"{ip} is a private address"
        if one.is_reserved or not one.is_global:
            return f"{ip} is not a public address"
    return None


class NetGuard:
    """The guard for one sidecar, from ``settings`` (``ALLOWED_URL_HOSTS``,
    ``ALLOW_PRIVATE_URLS``, ``PORT``, ``COMFYUI_PORT_HOST``, ``DIRECT_ADDRESS``)."""

    def __init__(self, settings: Settings) -> None:
        self.allow_private = settings.allow_private_urls
        self.networks: list[IPNetwork] = []
        self.host_globs: list[str] = []
        for item in settings.allowed_url_hosts:
            try:
                self.networks.append(ipaddress.ip_network(item.strip("[]"), strict=False))
            except ValueError:
                self.host_globs.append(item)
        self.ports = {
            settings.port: "the sidecar's own port",
            settings.comfyui_port: "ComfyUI's port",
        }
        self._local = _local_addresses([settings.direct_address])

    # --- checks ----------------------------------------------------------------------------

    def host_allowed(self, host: str) -> bool:
        """True when ``host`` (a name) matches an ``ALLOWED_URL_HOSTS`` glob."""
        return bool(self.host_globs) and host_matches(host, self.host_globs)

    def problem(self, host: str, ip: IPAddress, port: int) -> str | None:
        """Why connecting to ``ip``:``port`` (resolved from ``host``) is refused, or None."""
        for one in embedded(ip):
            if port in self.ports and (one.is_loopback or one.is_unspecified or one in self._local):
                return f"{host}:{port} is {self.ports[port]}"
        reason = address_problem(ip)
        if reason is None or self.allow_private or self.host_allowed(host):
            return None
        if any(one in net for one in embedded(ip) for net in self.networks):
            return None
        return f"{reason} (set ALLOWED_URL_HOSTS or ALLOW_PRIVATE_URLS to allow it)"

    def resolve(self, host: str, port: int) -> str:
        """Resolve ``host`` once, check every address, return the first (to connect to).
        Blocking (``getaddrinfo``): call it in a thread. Raises :class:`URLRefused`."""
        host = host.strip("[]")
        try:
            addresses = _addresses(host, port)
        except (OSError, UnicodeError, ValueError):
            raise URLRefused(f"cannot resolve host {host!r}") from None
        self.check_addresses(host, port, addresses)
        return addresses[0]

    def check_addresses(self, host: str, port: int, addresses: list[str]) -> None:
        """Raise :class:`URLRefused` when one of ``addresses`` (``host``'s) is refused."""
        for address in addresses:
            reason = self.problem(host, ipaddress.ip_address(address), port)
            if reason is not None:
                raise URLRefused(f"URL refused: {reason}")

    async def aresolve(self, host: str, port: int) -> str:
        """:meth:`resolve` off the event loop."""
        return await asyncio.to_thread(self.resolve, host, port)

    def connect_address(self, host: str, port: int) -> str:
        """The address a hand-made socket connects to: ``host`` itself inside :func:`trusted`
        (pass the flag on to threads yourself), else :meth:`resolve`."""
        return host if is_trusted() else self.resolve(host, port)

    async def check_host(self, host: str, port: int, *, proxied: bool) -> None:
        """Refuse a request of a caller's to ``host``:``port`` unless every address of the host
        may be reached. ``proxied``: the request goes through a forward proxy, which resolves
        the name itself; then a name that does not resolve here is refused unless it matches
        ``ALLOWED_URL_HOSTS`` (which lets a name through unresolved). Without ``proxied`` such a
        name passes (nothing can be reached through it; the connection is checked again).
        Resolves off the event loop. Raises :class:`URLRefused`."""
        host = host.strip("[]")
        try:
            literal: IPAddress | None = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            literal = None
        if literal is not None:
            self.check_addresses(host, port, [str(literal)])
            return
        if proxied and self.host_allowed(host):
            return
        try:
            addresses = await asyncio.to_thread(_addresses, host, port)
        except (OSError, UnicodeError, ValueError):
            if not proxied:
                return
            raise URLRefused(
                f"URL refused: host {host!r} does not resolve here, so its address cannot be "
                "checked; through HTTP(S)_PROXY such a host must be listed in ALLOWED_URL_HOSTS"
            ) from None
        self.check_addresses(host, port, addresses)

    async def check_url(self, url: str, *, resolve: bool = True) -> None:
        """Refuse ``url`` unless its scheme is http, https or s3 and (for http(s), with
        ``resolve``) its host passes :meth:`check_host`, through the proxy :func:`proxy_for`
        gives it if any. Raises :class:`URLRefused`."""
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError:
            raise URLRefused("URL refused: not a valid URL") from None
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES:
            raise URLRefused(f"URL refused: scheme {scheme or '(none)'!r} is not http, https or s3")
        if scheme == "s3" or not resolve or is_trusted():
            return
        if not parts.hostname:
            raise URLRefused("URL refused: no host")
        proxied = proxy_for(scheme, parts.hostname) is not None
        await self.check_host(parts.hostname, port or DEFAULT_PORTS[scheme], proxied=proxied)

    async def check_field(
        self, url: str, location: str, *, schemes: Iterable[str] = SCHEMES
    ) -> None:
        """:meth:`check_url` for a request field: raises :class:`InputError` naming
        ``location`` (e.g. ``webhook_v2``, ``http_upload.url_prefix``)."""
        try:
            scheme = urllib.parse.urlsplit(url).scheme.lower()
        except (ValueError, AttributeError):
            scheme = ""
        if scheme not in tuple(schemes):
            raise InputError(
                f"{location}: URL refused: scheme must be one of {', '.join(schemes)}", location
            )
        try:
            await self.check_url(url)
        except URLRefused as exc:
            raise InputError(f"{location}: {exc}", location) from None


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The TLS context every httpx client of the sidecar uses (``verify=``): httpx's default
    one (certifi's CA bundle, or ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``), made once. Each client
    made its own before, about 0.8 MB of memory apiece (bench/rss_bench.py)."""
    import httpx

    return httpx.create_ssl_context()


def _addresses(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for ``host`` (scope ids dropped). Raises
    ``OSError`` (also when there is none)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = [str(info[4][0]).split("%", 1)[0] for info in infos]
    if not addresses:
        raise OSError(f"no address for {host!r}")
    return addresses


def _local_addresses(extra: Iterable[str]) -> set[IPAddress]:
    """This machine's own addresses (from its host name) plus ``extra`` addresses."""
    found: set[IPAddress] = set()
    names = [socket.gethostname(), *extra]
    for name in names:
        try:
            infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError, ValueError):
            continue
        for info in infos:
            with contextlib.suppress(ValueError):
                found.add(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]))
    return found
