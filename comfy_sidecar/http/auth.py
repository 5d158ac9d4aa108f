"""API key authentication for the HTTP API (Litestar's authentication middleware).

:func:`create_app` puts every route whose path is not in :func:`open_paths` on one router that
carries :class:`ApiKeyMiddleware` and declares :data:`SECURITY` in the OpenAPI document, so the
doc and the check agree by construction. The API docs themselves (``/docs``, its assets and the
OpenAPI documents) stay open, so a browser can load them and authorize there.

The middleware runs before the handler reads the body: a request without a valid key is
answered 401, ``WWW-Authenticate: Bearer``, ``{"error": ..., "location": "authorization"}``,
and its body is never read. The key is taken from ``Authorization: Bearer <key>`` or
``X-API-Key: <key>`` (either may be the valid one) and never logged or echoed. A request let in
carries its key's :class:`~comfy_sidecar.config.keys.KeyPolicy` (name, quotas, priority) as
the scope's ``user`` (:func:`caller_of`): the job layer gets the name and quotas, never the
key.

A signed asset content URL (``GET /api/v2/assets/{id}/content?exp=&sig=``) is its own
credential: it passes without a key and its route checks the signature
(:func:`signed_content`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from litestar.connection import ASGIConnection
from litestar.datastructures import Headers
from litestar.exceptions import NotAuthorizedException
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult
from litestar.openapi.spec import SecurityRequirement, SecurityScheme

from comfy_sidecar.config.keys import KeyPolicy

if TYPE_CHECKING:
    from comfy_sidecar.config import Settings
    from comfy_sidecar.http.apikeys import ApiKeys

#: Paths answered without a key: the probes (a load balancer or kubelet has no key).
OPEN_PATHS: frozenset[str] = frozenset({"/health", "/ready", "/api/v2/health"})
#: Open too unless ``METRICS_REQUIRE_AUTH=true``.
METRICS_PATH = "/metrics"

#: OpenAPI security schemes (``components.securitySchemes``): what /docs's Authorize offers.
SECURITY_SCHEMES: dict[str, SecurityScheme] = {
    "BearerAuth": SecurityScheme(
        type="http", scheme="bearer", description="`Authorization: Bearer <API key>`"
    ),
    "ApiKeyAuth": SecurityScheme(
        type="apiKey",
        name="X-API-Key",
        security_scheme_in="header",
        description="`X-API-Key: <API key>`",
    ),
}
#: The requirement on every protected operation: either scheme will do.
SECURITY: list[SecurityRequirement] = [{"BearerAuth": []}, {"ApiKeyAuth": []}]

MISSING = "an API key is required: send `Authorization: Bearer <key>` or `X-API-Key: <key>`"
INVALID = "the API key is not valid"
CHALLENGE = {"WWW-Authenticate": "Bearer"}


def open_paths(settings: Settings) -> frozenset[str]:
    """The paths that need no key: :data:`OPEN_PATHS`, plus /metrics unless
    ``METRICS_REQUIRE_AUTH`` is true."""
    return OPEN_PATHS if settings.metrics_require_auth else OPEN_PATHS | {METRICS_PATH}


def presented_keys(headers: Headers) -> list[str]:
    """The keys a request carries: the ``Authorization: Bearer`` token, then ``X-API-Key``."""
    keys = []
    scheme, _, token = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        keys.append(token.strip())
    api_key = headers.get("x-api-key", "").strip()
    if api_key:
        keys.append(api_key)
    return keys


#: The ``opt`` flag of a route whose signed URLs need no key (the v2 asset content route).
SIGNED_CONTENT = "signed_content"


def signed_content(connection: ASGIConnection[Any, Any, Any, Any]) -> bool:
    """True for a request to a route flagged :data:`SIGNED_CONTENT` that carries a signed
    URL's ``sig`` or ``exp``: it passes without a key, and the route answers 403 unless the
    signature verifies (:meth:`comfy_sidecar.assets.signing.UrlSigner.verify`). Without them
    the route needs a key as every other does."""
    handler = connection.scope.get("route_handler")
    if handler is None or not handler.opt.get(SIGNED_CONTENT):
        return False
    query = connection.query_params
    return "sig" in query or "exp" in query


class ApiKeyMiddleware(AbstractAuthenticationMiddleware):
    """Refuses, with 401, a request that carries none of the app's keys (the
    :class:`~comfy_sidecar.http.apikeys.ApiKeys` in ``app.state.api_keys``, looked up per request:
    Litestar copies route middleware, and a SIGHUP reload must reach every copy). CORS
    preflights (OPTIONS) pass, as Litestar's authentication middleware does by default."""

    async def authenticate_request(
        self, connection: ASGIConnection[Any, Any, Any, Any]
    ) -> AuthenticationResult:
        """The request's auth result; raises ``NotAuthorizedException`` (401) without a key
        or with a wrong one."""
        if signed_content(connection):
            return AuthenticationResult(user=None, auth=None)  # the handler checks the URL
        presented = presented_keys(connection.headers)
        if not presented:
            raise NotAuthorizedException(MISSING, headers=CHALLENGE)
        keys: ApiKeys = connection.app.state.api_keys
        found: KeyPolicy | None = None
        for key in presented:  # every one checked: no early exit
            policy = keys.identify(key)
            if found is None:
                found = policy
        if found is None:
            raise NotAuthorizedException(INVALID, headers=CHALLENGE)
        return AuthenticationResult(user=found, auth=None)


def caller_of(scope: Any) -> KeyPolicy | None:
    """The :class:`~comfy_sidecar.config.keys.KeyPolicy` of the key a request was let in with
    (the first valid one it carries, the ``Authorization`` one first), or None when no key is
    configured (or on an open route)."""
    user = scope.get("user")
    return user if isinstance(user, KeyPolicy) else None
