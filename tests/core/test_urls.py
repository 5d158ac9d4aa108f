"""comfy_sidecar.net.urls: the one URL scrubber and the one is-this-a-URL test."""

from __future__ import annotations

import pytest

from comfy_sidecar.net.urls import UNPARSEABLE, is_url, scrub_url


def test_azure_sas_url_keeps_its_fields_but_not_the_signature() -> None:
    url = (
        "https://acct.blob.core.windows.net/models/m.safetensors"
        "?sv=2022-11-02&ss=b&srt=o&sp=r&se=2030-01-01T00:00:00Z&spr=https&sig=abc%2Bdef%3D"
    )
    assert scrub_url(url) == (
        "https://acct.blob.core.windows.net/models/m.safetensors"
        "?sv=2022-11-02&ss=b&srt=o&sp=r&se=2030-01-01T00:00:00Z&spr=https&sig=REDACTED"
    )


def test_s3_presigned_url_redacts_signature_credential_and_session_token() -> None:
    url = (
        "https://bucket.s3.us-east-1.amazonaws.com/out/a.png?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIAEXAMPLE%2F20300101%2Fus-east-1%2Fs3%2Faws4_request"
        "&X-Amz-Date=20300101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
        "&X-Amz-Security-Token=FwoGZXIvYXdzEXAMPLE&X-Amz-Signature=0123abcd"
    )
    scrubbed = scrub_url(url)
    assert scrubbed == (
        "https://bucket.s3.us-east-1.amazonaws.com/out/a.png?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=REDACTED&X-Amz-Date=20300101T000000Z&X-Amz-Expires=3600"
        "&X-Amz-SignedHeaders=host&X-Amz-Security-Token=REDACTED&X-Amz-Signature=REDACTED"
    )
    for secret in ("AKIAEXAMPLE", "FwoGZXIvYXdzEXAMPLE", "0123abcd"):
        assert secret not in scrubbed


def test_basic_auth_url_loses_user_and_password_keeps_port() -> None:
    assert scrub_url("https://user:p%40ss@files.example:8443/a/b.bin?x=1#frag") == (
        "https://files.example:8443/a/b.bin?x=1#frag"
    )
    assert scrub_url("https://ghp_token@github.com/o/r.git") == "https://github.com/o/r.git"


def test_webhook_url_with_token_parameter() -> None:
    assert scrub_url("https://hooks.example/in?token=s3cr3t&job=7") == (
        "https://hooks.example/in?token=REDACTED&job=7"
    )


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("access_token", True),
        ("api_key", True),
        ("apiKey", True),
        ("key", True),
        ("secret", True),
        ("client_secret", True),
        ("password", True),
        ("Authorization", True),
        ("AWSAccessKeyId", True),
        ("Signature", True),
        ("page", False),
        ("format", False),
        ("X-Amz-Expires", False),
    ],
)
def test_which_parameter_names_are_secret(name: str, secret: bool) -> None:
    scrubbed = scrub_url(f"https://h.example/p?{name}=VALUE&other=1")
    assert ("VALUE" not in scrubbed) is secret
    assert scrubbed.endswith("&other=1")


def test_urls_without_secrets_are_unchanged() -> None:
    for url in (
        "s3://bucket/key.png",
        "https://h.example/a%20b.png?q=a+b&empty=&flag",
        "http://h.example",
    ):
        assert scrub_url(url) == url


def test_fragment_tokens_are_redacted_too() -> None:
    assert scrub_url("https://h.example/cb#access_token=abc&state=1") == (
        "https://h.example/cb#access_token=REDACTED&state=1"
    )


def test_unparseable_url() -> None:
    assert scrub_url("http://[::1/x?sig=abc") == UNPARSEABLE


@pytest.mark.parametrize(
    "value",
    [
        "http://h/x.png",
        "https://h.example/a?b=c",
        "s3://bucket/key",
        "HTTPS://H.EXAMPLE/X.PNG",
        "http://user:pw@h/x",
    ],
)
def test_is_url_accepts_downloadable_urls(value: str) -> None:
    assert is_url(value)


@pytest.mark.parametrize(
    "value",
    [
        "http://",
        "https:///path",
        "s3://?x",
        "ftp://h/x",
        "file:///etc/passwd",
        "image.png",
        "aGVsbG8=",
        "",
        None,
        42,
        b"http://h/x",
    ],
)
def test_is_url_refuses_everything_else(value: object) -> None:
    assert not is_url(value)
