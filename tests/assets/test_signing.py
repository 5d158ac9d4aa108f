"""Signed asset content URLs: shape, expiry in RFC 3339, and every way a URL is refused."""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

import pytest

from comfy_sidecar.assets.signing import UrlSigner
from comfy_sidecar.errors import AssetUrlRefused

NOW = 1_800_000_000.0
ASSET = "9f8a1c0d-2b3e-4f56-8a7b-1c2d3e4f5a6b"


def query(path: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(path)
    return parts.path, {k: v[0] for k, v in parse_qs(parts.query).items()}


def refused(signer: UrlSigner, asset_id: str, exp: str | None, sig: str | None, **kw: float) -> str:
    with pytest.raises(AssetUrlRefused) as caught:
        signer.verify(asset_id, exp, sig, **kw)
    return str(caught.value.fields["reason"])


def test_a_signed_url_is_the_content_route_with_exp_and_sig() -> None:
    signer = UrlSigner("a shared secret of the replicas", ttl_s=900)
    signed = signer.sign(ASSET, now=NOW + 0.25)
    path, values = query(signed.path)
    assert path == f"/api/v2/assets/{ASSET}/content"
    assert values["exp"] == str(int(NOW) + 901)  # rounded up to a whole second
    assert signed.expires_at == datetime.fromtimestamp(int(NOW) + 901, UTC)
    assert signed.expires_at_text.endswith("+00:00")
    assert datetime.fromisoformat(signed.expires_at_text) == signed.expires_at
    assert signed.absolute("https://gpu-7.example:3000/") == "https://gpu-7.example:3000" + (
        signed.path
    )
    signer.verify(ASSET, values["exp"], values["sig"], now=NOW + 900)  # accepted
    assert not signer.ephemeral


def test_replicas_sharing_the_secret_accept_each_others_urls() -> None:
    a = UrlSigner("a shared secret of the replicas", ttl_s=60)
    b = UrlSigner(b"a shared secret of the replicas", ttl_s=60, prefix="/api/v2/")
    _, values = query(a.sign(ASSET, now=NOW).path)
    b.verify(ASSET, values["exp"], values["sig"], now=NOW)


def test_tampered_expired_and_foreign_urls_are_refused() -> None:
    signer = UrlSigner("a shared secret of the replicas", ttl_s=60)
    _, values = query(signer.sign(ASSET, now=NOW).path)
    exp, sig = values["exp"], values["sig"]
    flipped = ("A" if sig[0] != "A" else "B") + sig[1:]
    assert refused(signer, ASSET, exp, flipped, now=NOW) == "bad_signature"
    assert refused(signer, ASSET.replace("9f", "8f"), exp, sig, now=NOW) == "bad_signature"
    assert refused(signer, ASSET, str(int(exp) + 3600), sig, now=NOW) == "bad_signature"
    assert refused(signer, ASSET, exp, sig, now=float(exp) + 1) == "expired"
    for bad_exp in (None, "", "-5", "1e9", "12345678901234", "\uff11\uff12"):  # fullwidth 12
        assert refused(signer, ASSET, bad_exp, sig, now=NOW) == "bad_signature"
    assert refused(signer, ASSET, exp, None, now=NOW) == "bad_signature"
    assert refused(signer, ASSET, exp, "é" + sig[1:], now=NOW) == "bad_signature"
    other = UrlSigner("another replica's own secret!!", ttl_s=60)
    assert refused(other, ASSET, exp, sig, now=NOW) == "bad_signature"


def test_without_a_secret_each_start_makes_its_own_key() -> None:
    first, second = UrlSigner(None, ttl_s=60), UrlSigner(None, ttl_s=60)
    assert first.ephemeral and second.ephemeral
    _, values = query(first.sign(ASSET, now=NOW).path)
    first.verify(ASSET, values["exp"], values["sig"], now=NOW)
    assert refused(second, ASSET, values["exp"], values["sig"], now=NOW) == "bad_signature"
    with pytest.raises(ValueError):
        UrlSigner(None, ttl_s=0)
