"""The download cache over the HTTP backend: naming, dedup, atomicity, auth gating, LRU."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

import comfy_sidecar.storage.cache as cache_module
from comfy_sidecar.schemas import BasicAuth, BearerAuth, Credential, HeaderAuth, QueryAuth
from comfy_sidecar.storage import (
    AuthError,
    BackendError,
    BadRequestError,
    CacheConflictError,
    NotFoundError,
    Storage,
)
from comfy_sidecar.storage.backends.base import extname
from comfy_sidecar.storage.cache import INDEX_NAME, DownloadCache, cache_key, cache_name
from tests.forward_proxy import ForwardProxy, forward_proxy
from tests.storage.servers import FileServer

__all__ = ["forward_proxy"]  # the fixture, used by name

CIVITAI = (
    "https://civitai.com/api/download/models/128713?type=Model&format=SafeTensor"
    "&size=pruned&fp=fp16"
)


def test_cache_names_match_comfyui_api() -> None:
    assert cache_key(CIVITAI) == "Pk6VSKLStckZydwGhX0bM8TqaqHEW9yt"
    assert cache_name(CIVITAI, ".safetensors") == "Pk6VSKLStckZydwGhX0bM8TqaqHEW9yt.safetensors"
    assert cache_name("https://x.org/a/b.PNG?x=1").endswith(".PNG")
    assert cache_name("s3://bucket/dir/model.ckpt").endswith(".ckpt")
    # Node path.extname semantics
    assert extname("/a/.bashrc") == ""
    assert extname("/a/file.") == "."
    assert extname("/a/b.tar.gz") == ".gz"
    assert extname("/a/noext") == ""
    assert extname("/a.b/noext") == ""


def test_credentials_glob_first_match_wins() -> None:
    creds = [
        Credential(url_pattern="https://*.example.com/*", auth=BearerAuth(token="one")),
        Credential(url_pattern="https://a.example.com/**", auth=BearerAuth(token="two")),
        Credential(url_pattern="https://h?st.org/x.bin", auth=BearerAuth(token="three")),
    ]
    first = Storage.credentials_for("https://a.example.com/m.bin", creds)
    assert isinstance(first, BearerAuth) and first.token == "one"
    deep = Storage.credentials_for("https://a.example.com/d/m.bin", creds)
    assert isinstance(deep, BearerAuth) and deep.token == "two"
    q = Storage.credentials_for("https://host.org/x.bin", creds)
    assert isinstance(q, BearerAuth) and q.token == "three"
    assert Storage.credentials_for("https://hostxorg/x.bin", creds) is None  # '.' escaped
    assert Storage.credentials_for("https://b.example.com/d/m.bin", creds) is None
    assert Storage.credentials_for("https://a.example.com/x", None) is None


def test_download_stage_input_and_model(
    make_storage: Any,
    http_server: FileServer,
    tmp_path: Path,
    png_bytes: bytes,
    model_bytes: bytes,
    events: list[tuple[str, dict[str, Any]]],
) -> None:
    http_server.files["in.png"] = png_bytes
    http_server.files["m.safetensors"] = model_bytes

    async def main() -> None:
        storage = make_storage()
        await storage.start()
        try:
            url = http_server.url("/files/in.png")
            name = await storage.stage_input(url, None, tmp_path / "input", "job1/in.png")
            assert name == "job1/in.png"
            staged = tmp_path / "input" / "job1" / "in.png"
            assert staged.read_bytes() == png_bytes
            assert not staged.is_symlink()
            cached = storage.cache.dir / cache_name(url)
            assert os.path.samefile(staged, cached)  # hardlink
            murl = http_server.url("/files/m.safetensors")
            folder = tmp_path / "models" / "upscale_models"
            mname = await storage.stage_model(murl, None, folder)
            assert mname == cache_key(murl) + ".safetensors"
            assert (folder / mname).read_bytes() == model_bytes
            # a hit does not download again
            await storage.stage_input(url, None, tmp_path / "input", "job2/in.png")
            assert http_server.count("GET", "/files/in.png") == 1
        finally:
            await storage.close()
        downloaded = [d for n, d in events if n == "file_downloaded"]
        assert len(downloaded) == 2
        assert downloaded[0]["size"] == len(png_bytes)
        assert set(downloaded[0]) == {"url", "local_path", "size", "duration"}
        index = (storage.cache.dir / INDEX_NAME).read_bytes()
        assert cache_key(url).encode() in index

    asyncio.run(main())


def test_extension_fallbacks(make_storage: Any, http_server: FileServer, tmp_path: Path) -> None:
    http_server.files["blob"] = b"x" * 100

    async def main() -> None:
        storage = make_storage()
        await storage.start()
        try:
            cd = http_server.url("/noext/blob?cd=model.safetensors")
            assert (await storage.fetch(cd, None)).name == cache_key(cd) + ".safetensors"
            # final URL after redirects
            target = http_server.url("/files/blob")
            http_server.files["final.ckpt"] = b"y" * 10
            redir = http_server.url("/redirect?to=/files/final.ckpt")
            assert (await storage.fetch(redir, None)).name == cache_key(redir) + ".ckpt"
            ct = http_server.url("/noext/blob?ct=image/png")
            assert (await storage.fetch(ct, None)).name == cache_key(ct) + ".png"
            assert (await storage.fetch(target, None)).name == cache_key(target) + ".bin"
        finally:
            await storage.close()

    asyncio.run(main())


def test_eight_concurrent_requests_one_download(
    make_storage: Any, http_server: FileServer, tmp_path: Path, model_bytes: bytes
) -> None:
    http_server.files["m.safetensors"] = model_bytes
    http_server.delay_s = 0.3

    async def main() -> None:
        storage = make_storage()
        await storage.start()
        try:
            url = http_server.url("/files/m.safetensors")
            names = await asyncio.gather(
                *(
                    storage.stage_input(url, None, tmp_path / "in", f"j{i}.safetensors")
                    for i in range(8)
                )
            )
            assert names == [f"j{i}.safetensors" for i in range(8)]
            for i in range(8):
                assert (tmp_path / "in" / f"j{i}.safetensors").read_bytes() == model_bytes
        finally:
            await storage.close()
        assert http_server.count("GET", "/files/m.safetensors") == 1
        assert storage.cache.downloads_started == 1

    asyncio.run(main())


def test_cut_download_leaves_no_entry(
    make_storage: Any, http_server: FileServer, tmp_path: Path
) -> None:
    http_server.files["big.bin"] = os.urandom(1 << 20)

    async def main() -> None:
        storage = make_storage()
        await storage.start()
        try:
            url = http_server.url("/cut/big.bin")
            with pytest.raises(BackendError):
                await storage.stage_input(url, None, tmp_path / "in", "x.bin")
            assert storage.cache.entry(url) is None
            left = [p.name for p in storage.cache.dir.iterdir() if p.name != INDEX_NAME]
            assert left == []
            assert not (tmp_path / "in" / "x.bin").exists()
            # a second try downloads again (a partial file is never a hit)
            with pytest.raises(BackendError):
                await storage.fetch(url, None)
            assert http_server.count("GET", "/cut/") == 2
        finally:
            await storage.close()

    asyncio.run(main())


def test_http_errors_map_to_statuses(make_storage: Any, http_server: FileServer) -> None:
    http_server.files["p.bin"] = b"p"

    async def main() -> None:
        storage = make_storage()
        await storage.start()
        try:
            with pytest.raises(BadRequestError):
                await storage.fetch("ftp://example.com/x", None)
            with pytest.raises(NotFoundError):
                await storage.fetch(http_server.url("/files/missing.png"), None)
            with pytest.raises(AuthError):
                await storage.fetch(http_server.url("/auth/p.bin"), None)
        finally:
            await storage.close()

    asyncio.run(main())


def test_auth_kinds_and_gated_entries(
    make_storage: Any, http_server: FileServer, tmp_path: Path
) -> None:
    http_server.files["s.bin"] = b"secret data"
    http_server.files["q.bin"] = b"query data"
    http_server.files["h.bin"] = b"header data"
    http_server.files["u.bin"] = b"userinfo data"

    async def main() -> None:
        storage = make_storage()
        await storage.start()
        inp = tmp_path / "in"
        try:
            url = http_server.url("/auth/s.bin")
            with pytest.raises(AuthError):
                await storage.stage_input(url, None, inp, "a.bin")
            await storage.stage_input(url, BearerAuth(token="secret"), inp, "a.bin")
            entry = storage.cache.entry(url)
            assert entry is not None and entry.auth_required
            # cached, but served only to callers whose auth the server accepts now
            with pytest.raises(AuthError):
                await storage.stage_input(url, None, inp, "b.bin")
            with pytest.raises(AuthError):
                await storage.stage_input(url, BearerAuth(token="wrong"), inp, "b.bin")
            await storage.stage_input(
                url, BasicAuth(username="user", password="pass"), inp, "b.bin"
            )
            assert (inp / "b.bin").read_bytes() == b"secret data"
            assert http_server.count("GET", "/auth/s.bin") == 2  # 401 + the one download
            assert http_server.count("HEAD", "/auth/s.bin") == 3
            await storage.fetch(
                http_server.url("/auth/q.bin"), QueryAuth(query_param="key", query_value="k")
            )
            await storage.fetch(
                http_server.url("/auth/h.bin"), HeaderAuth(header_name="X-Key", header_value="k")
            )
            creds_url = f"http://user:pass@127.0.0.1:{http_server.port}/auth/u.bin"
            path = await storage.fetch(creds_url, None)
            assert path.read_bytes() == b"userinfo data"
            entry = storage.cache.entry(creds_url)
            assert entry is not None and "pass" not in entry.url and entry.auth_required
        finally:
            await storage.close()
        assert b"pass@" not in (storage.cache.dir / INDEX_NAME).read_bytes()

    asyncio.run(main())


def test_caller_auth_not_sent_across_origins_and_env_header_allow_list(
    make_storage: Any, http_server: FileServer
) -> None:
    http_server.files["f.bin"] = b"data"

    async def main() -> None:
        storage = make_storage(
            HTTP_AUTH_HEADER_NAME="X-Operator",
            HTTP_AUTH_HEADER_VALUE="opsecret",
            HTTP_AUTH_HEADER_HOSTS="127.0.0.1",
        )
        await storage.start()
        try:
            other = http_server.url("/files/f.bin", host="localhost")
            redir = http_server.url(f"/redirect?to={other}")
            await storage.fetch(redir, BearerAuth(token="secret"))
            await storage.fetch(http_server.url("/files/f.bin?plain=1"), None)
            await storage.fetch(http_server.url("/files/f.bin?x=2", host="localhost"), None)
        finally:
            await storage.close()
        by_path = {(m, p): h for m, p, h in http_server.requests}
        first = by_path[("GET", f"/redirect?to={other}")]
        assert first.get("Authorization") == "Bearer secret"
        after = by_path[("GET", "/files/f.bin")]
        assert "Authorization" not in after  # the other origin gets no caller credentials
        assert "X-Operator" not in after  # localhost is not on the allow-list
        assert by_path[("GET", "/files/f.bin?plain=1")].get("X-Operator") == "opsecret"
        assert "X-Operator" not in by_path[("GET", "/files/f.bin?x=2")]

    asyncio.run(main())


def test_lru_eviction_order_and_leases(
    make_storage: Any,
    http_server: FileServer,
    monkeypatch: pytest.MonkeyPatch,
    events: list[tuple[str, dict[str, Any]]],
) -> None:
    for name in "abcde":
        http_server.files[f"{name}.bin"] = name.encode() * 400  # 400 bytes each
    limit_gb = str(1000 / 1024**3)  # room for two entries
    # The wall clock stands still after the first download: b's download and a's re-use fall
    # in one millisecond, which tied them when the order was a time (a, re-used, was evicted).
    # The order is the cache's use counter, whatever the clock says.
    ticks = iter([1000])
    monkeypatch.setattr(cache_module, "_now_ms", lambda: next(ticks, 2000))

    async def main() -> None:
        storage = make_storage(LRU_CACHE_SIZE_GB=limit_gb)
        await storage.start()
        url = {n: http_server.url(f"/files/{n}.bin") for n in "abcde"}
        try:
            await storage.fetch(url["a"], None)
            await storage.fetch(url["b"], None)
            await storage.fetch(url["a"], None)  # a is now more recent than b
            await storage.fetch(url["c"], None)
            await storage.cache.evict()
            assert {e.url for e in storage.cache.entries().values()} == {url["a"], url["c"]}
            # a leased entry survives even as the least recently used one
            with storage.lease() as lease:
                await storage.fetch(url["a"], None, lease)
                await storage.fetch(url["c"], None)
                await storage.fetch(url["d"], None)
                await storage.fetch(url["e"], None)
                await storage.cache.evict()
                assert {e.url for e in storage.cache.entries().values()} == {url["a"], url["e"]}
            await storage.cache.evict()
            assert storage.cache.total_bytes() == 800
            on_disk = sorted(p.name for p in storage.cache.dir.iterdir() if p.name != INDEX_NAME)
            assert on_disk == sorted(e.file for e in storage.cache.entries().values())
        finally:
            await storage.close()
        deleted = [d["url"] for n, d in events if n == "file_deleted"]
        assert deleted == [url["b"], url["c"], url["d"]]

    asyncio.run(main())


def test_lru_order_of_an_old_index_is_kept(tmp_path: Path) -> None:
    """Entries of a version-1 index (no ``last_use``) and adopted comfyui-api files are
    ordered by their last-use time (ms; a file's mtime); the order survives a restart."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    urls = {n: f"https://example.com/{n}.bin" for n in "xyz"}
    used_ms = {"x": 3000, "y": 1000, "z": 2000}
    entries = {}
    for n, u in urls.items():
        (cache_dir / cache_name(u)).write_bytes(b"0" * 400)
        entries[cache_key(u)] = {
            "file": cache_name(u),
            "url": u,
            "size": 400,
            "created_ms": 500,
            "last_used_ms": used_ms[n],
            "auth_required": False,
            "links": [],
        }
    (cache_dir / INDEX_NAME).write_text(json.dumps({"version": 1, "entries": entries}))
    adopted = cache_name("https://example.com/adopted.bin")
    (cache_dir / adopted).write_bytes(b"0" * 400)
    os.utime(cache_dir / adopted, (1.5, 1.5))  # used between y and z

    async def main() -> None:
        cache = DownloadCache(cache_dir, max_bytes=0)
        await cache.start()
        order = sorted(cache.entries().values(), key=lambda e: e.last_use)
        names = [cache_name(urls["y"]), adopted, cache_name(urls["z"]), cache_name(urls["x"])]
        assert [e.file for e in order] == names
        await cache.close()
        again = DownloadCache(cache_dir, max_bytes=1000)
        await again.start()  # evicts down to 1000 bytes: the two least recently used go
        assert {e.url for e in again.entries().values()} == {urls["z"], urls["x"]}
        assert {p.name for p in cache_dir.iterdir()} == {INDEX_NAME, *names[2:]}
        await again.close()

    asyncio.run(main())


def test_index_survives_restart_and_adopts_comfyui_api_files(
    make_storage: Any, http_server: FileServer, tmp_path: Path
) -> None:
    http_server.files["r.bin"] = b"restart"

    async def main() -> None:
        storage = make_storage()
        await storage.start()
        url = http_server.url("/files/r.bin")
        await storage.fetch(url, BearerAuth(token="t"))
        await storage.close()
        # a file left by comfyui-api, with its .meta
        legacy = "https://example.com/legacy.png"
        legacy_file = storage.cache.dir / cache_name(legacy)
        legacy_file.write_bytes(b"legacy")
        legacy_file.with_name(legacy_file.name + ".meta").write_text(
            '{"authRequired": false, "url": "https://example.com/legacy.png"}'
        )
        (storage.cache.dir / ".partial-junk").mkdir()
        again = make_storage()
        await again.start()
        try:
            entry = again.cache.entry(url)
            assert entry is not None and entry.auth_required
            path = await again.stage_input(legacy, None, tmp_path / "in", "l.png")
            assert (tmp_path / "in" / path).read_bytes() == b"legacy"
            assert not (again.cache.dir / ".partial-junk").exists()
        finally:
            await again.close()
        assert http_server.count("GET", "/files/r.bin") == 1

    asyncio.run(main())


def test_link_replaces_other_urls_link_but_not_foreign_files(
    make_storage: Any, http_server: FileServer, tmp_path: Path
) -> None:
    http_server.files["one.bin"] = b"one"
    http_server.files["two.bin"] = b"two"

    async def main() -> None:
        storage = make_storage()
        await storage.start()
        dest = tmp_path / "models" / "checkpoints" / "mine.bin"
        try:
            await storage.link(http_server.url("/files/one.bin"), None, dest)
            assert dest.read_bytes() == b"one"
            await storage.link(http_server.url("/files/two.bin"), None, dest)
            assert dest.read_bytes() == b"two"
            foreign = tmp_path / "models" / "checkpoints" / "user.bin"
            foreign.write_bytes(b"user's own file")
            with pytest.raises(CacheConflictError):
                await storage.link(http_server.url("/files/one.bin"), None, foreign)
            assert foreign.read_bytes() == b"user's own file"
        finally:
            await storage.close()

    asyncio.run(main())


@pytest.mark.parametrize("name", ["../x.png", "/etc/passwd", "a/../../x", "a\x00b", ""])
def test_stage_input_refuses_traversal(
    make_storage: Any, http_server: FileServer, tmp_path: Path, name: str
) -> None:
    http_server.files["t.png"] = b"t"

    async def main() -> None:
        storage = make_storage()
        await storage.start()
        try:
            with pytest.raises(BadRequestError):
                await storage.stage_input(http_server.url("/files/t.png"), None, tmp_path, name)
        finally:
            await storage.close()
        assert http_server.count("GET", "/files/t.png") == 0

    asyncio.run(main())


def test_httpx_path_used_behind_a_proxy(
    make_storage: Any,
    http_server: FileServer,
    forward_proxy: ForwardProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With HTTP(S)_PROXY applying (a real tinyproxy), downloads go through httpx and the proxy:
    same results for a plain file, a cut body, the extension fallbacks and cross-origin auth."""
    for name, value in forward_proxy.env().items():
        monkeypatch.setenv(name, value)
    http_server.files["p.bin"] = os.urandom(300_000)
    http_server.files["pblob"] = http_server.files["p.bin"]
    http_server.files["c.bin"] = os.urandom(300_000)

    async def main() -> None:
        storage = make_storage()
        await storage.start()
        try:
            url = http_server.url("/noext/pblob?cd=w.safetensors")
            path = await storage.fetch(url, None)
            assert path.name == cache_key(url) + ".safetensors"
            assert path.read_bytes() == http_server.files["p.bin"]
            with pytest.raises(BackendError):
                await storage.fetch(http_server.url("/cut/c.bin"), None)
            assert storage.cache.entry(http_server.url("/cut/c.bin")) is None
            other = http_server.url("/files/p.bin", host="localhost")
            await storage.fetch(http_server.url(f"/redirect?to={other}"), BearerAuth(token="s"))
        finally:
            await storage.close()
        after = [h for m, p, h in http_server.requests if p == "/files/p.bin"]
        assert after and all("Authorization" not in h for h in after)
        assert ("GET", other) in forward_proxy.requests(), "the redirect hop went through it"

    asyncio.run(main())


def test_eviction_removes_model_links_it_made(
    make_storage: Any, http_server: FileServer, tmp_path: Path
) -> None:
    http_server.files["m1.safetensors"] = b"1" * 600
    http_server.files["m2.safetensors"] = b"2" * 600

    async def main() -> None:
        storage = make_storage(LRU_CACHE_SIZE_GB=str(1000 / 1024**3))
        await storage.start()
        folder = tmp_path / "models" / "loras"
        try:
            first = await storage.stage_model(
                http_server.url("/files/m1.safetensors"), None, folder
            )
            assert (folder / first).exists()
            second = await storage.stage_model(
                http_server.url("/files/m2.safetensors"), None, folder
            )
            await storage.cache.evict()
            assert not (folder / first).exists()  # evicted with its link: space really freed
            assert (folder / second).read_bytes() == b"2" * 600
        finally:
            await storage.close()

    asyncio.run(main())


# --- a model folder that outlives the cache ----------------------------------------------------


def test_model_file_left_by_an_earlier_cache_is_adopted_without_downloading(
    make_storage: Any, http_server: FileServer, tmp_path: Path, model_bytes: bytes
) -> None:
    """The models volume persisted, CACHE_DIR did not: the file under the URL's cache name is
    that URL's download. A HEAD confirms its size; no GET is made, and it is indexed."""
    http_server.files["m.safetensors"] = model_bytes
    url = http_server.url("/files/m.safetensors")
    folder = tmp_path / "models" / "upscale_models"
    folder.mkdir(parents=True)
    (folder / cache_name(url)).write_bytes(model_bytes)

    async def main() -> None:
        storage = make_storage()
        await storage.start()
        try:
            name = await storage.stage_model(url, None, folder)
            assert name == cache_name(url)
            assert (folder / name).read_bytes() == model_bytes
            entry = storage.cache.entry(url)
            assert entry is not None and entry.size == len(model_bytes)
            assert os.path.samefile(folder / name, storage.cache.dir / name)
            assert storage.cache.downloads_started == 0
            await storage.stage_model(url, None, folder)  # now a plain hit
        finally:
            await storage.close()

    asyncio.run(main())
    assert http_server.count("GET", "/files/m.safetensors") == 0
    assert http_server.count("HEAD", "/files/m.safetensors") == 1


def test_model_file_of_another_size_is_replaced_atomically(
    make_storage: Any, http_server: FileServer, tmp_path: Path, model_bytes: bytes
) -> None:
    """A truncated leftover (a crash mid-copy) disagrees with the HEAD: downloaded again and
    put in its place, never a 409."""
    http_server.files["m.safetensors"] = model_bytes
    url = http_server.url("/files/m.safetensors")
    folder = tmp_path / "models" / "upscale_models"
    folder.mkdir(parents=True)
    (folder / cache_name(url)).write_bytes(model_bytes[:10])

    async def main() -> None:
        storage = make_storage()
        await storage.start()
        try:
            name = await storage.stage_model(url, None, folder)
            assert (folder / name).read_bytes() == model_bytes
            assert [p.name for p in folder.iterdir()] == [name]  # no temp file left
        finally:
            await storage.close()

    asyncio.run(main())
    assert http_server.count("GET", "/files/m.safetensors") == 1


def test_model_without_extension_found_by_its_key(
    make_storage: Any, http_server: FileServer, tmp_path: Path, model_bytes: bytes
) -> None:
    """A URL without an extension took one from its headers when it was downloaded: the file
    is found by its key and keeps that name."""
    http_server.files["m"] = model_bytes
    url = http_server.url("/noext/m?cd=m.safetensors")
    folder = tmp_path / "models" / "loras"
    folder.mkdir(parents=True)
    left = folder / f"{cache_key(url)}.safetensors"
    left.write_bytes(model_bytes)
    (folder / "user.safetensors").write_bytes(b"the user's own")

    async def main() -> None:
        storage = make_storage()
        await storage.start()
        try:
            assert await storage.stage_model(url, None, folder) == left.name
        finally:
            await storage.close()

    asyncio.run(main())
    assert http_server.count("GET", "/noext/m") == 0
    assert (folder / "user.safetensors").read_bytes() == b"the user's own"


def test_user_named_file_is_still_not_overwritten_by_a_link(
    make_storage: Any, http_server: FileServer, tmp_path: Path
) -> None:
    """A name the user chose (manifest ``local_path``) is never taken for a cache file, even
    when the URL's cache file name happens to be known."""
    http_server.files["one.bin"] = b"one"
    dest = tmp_path / "models" / "checkpoints" / "mine.bin"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"user's own file")

    async def main() -> None:
        storage = make_storage()
        await storage.start()
        try:
            with pytest.raises(CacheConflictError):
                await storage.link(http_server.url("/files/one.bin"), None, dest)
        finally:
            await storage.close()

    asyncio.run(main())
    assert dest.read_bytes() == b"user's own file"
