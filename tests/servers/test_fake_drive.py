"""pydrive2's real client (GoogleDrive / GDriveFileSystem) against fake_drive.

These tests pin down both the fake's fidelity and what pydrive2 actually does
(duplicate titles, retries, ranged reads, memory use), so ckptstore's gdrive
backend can rely on, or work around, each behaviour knowingly.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydrive2.drive import GoogleDrive
from pydrive2.files import ApiRequestError

from .fake_drive import (
    FOLDER_MIME,
    ExternalNetworkError,
    FakeCredentialsRefreshError,
    FakeDriveServer,
    block_external_network,
    make_gdrive_fs,
    make_google_auth,
    make_routed_http,
    small_upload_chunks,
)

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(autouse=True)
def network_guard():
    """Any attempt to reach a non-loopback host fails the test loudly."""
    with block_external_network() as refused:
        yield refused
    assert refused == [], f"something tried to reach the network: {refused}"


@pytest.fixture
def drive():
    with FakeDriveServer() as srv:
        yield srv
    assert srv.internal_errors == [], srv.internal_errors[0]
    assert srv.unsupported == [], f"client used features the fake lacks: {srv.unsupported}"


@pytest.fixture
def fs(drive):
    return make_gdrive_fs(drive)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def uploads(drive):
    """(method, Content-Range, status) of the upload requests, in order."""
    return [
        (r.method, r.headers.get("content-range"), r.status)
        for r in drive.requests(path=r"^/upload/")
    ]


# ---------------------------------------------------------------------------
# wiring: discovery, routing, auth
# ---------------------------------------------------------------------------


def test_static_discovery_and_every_request_routed_to_the_fake(drive):
    auth = make_google_auth(drive)
    gd = GoogleDrive(auth)
    f = gd.CreateFile({"title": "hello.txt"})
    f.SetContentString("hi")
    f.Upload()
    assert [i["title"] for i in gd.ListFile({"q": "'root' in parents"}).GetList()] == ["hello.txt"]
    # pydrive2 calls build("drive", "v2", http=..., cache_discovery=False): the
    # discovery doc shipped in googleapiclient is used, nothing is fetched.
    assert not [r for r in drive.request_log if "discovery" in r.path]
    # Requests were addressed to www.googleapis.com and rewritten to the fake,
    # through the per-thread Http pydrive2 gets from GoogleAuth._build_http.
    routed = auth.thread_local.http.routed
    assert routed and all(u.startswith(drive.url) for u in routed)
    # ...and the resumable session URL the fake handed out (a googleapis.com
    # URL, like Drive's) was followed through the same routing.
    assert any("upload_id=" in u for u in routed)


def test_served_discovery_document_builds_a_working_client(drive):
    from googleapiclient.discovery import build

    auth = make_google_auth(drive)
    http = auth.credentials.authorize(make_routed_http(drive))
    svc = build("drive", "v2", http=http, static_discovery=False, cache_discovery=False)
    drive.create_file("a.bin", b"abc")
    items = svc.files().list(q="'root' in parents and trashed=false").execute()["items"]
    assert [i["title"] for i in items] == ["a.bin"]
    assert drive.requests(path="discovery")[0].status == 200


def test_wrong_token_fails_loudly_instead_of_refreshing(drive):
    fs = make_gdrive_fs(drive, access_token="not-the-token")
    with pytest.raises(FakeCredentialsRefreshError):
        fs.ls("root")
    assert [r.status for r in drive.request_log] == [401]


def test_external_hosts_are_refused(drive, network_guard):
    http = make_routed_http(drive)
    with pytest.raises(ExternalNetworkError):
        http.request("https://oauth2.googleapis.com/token", "POST")
    import socket

    with pytest.raises(ExternalNetworkError):
        socket.create_connection(("www.googleapis.com", 443), timeout=1)
    s = socket.socket()
    try:
        with pytest.raises(ExternalNetworkError):
            s.connect(("192.0.2.1", 443))
    finally:
        s.close()
    assert len(network_guard) == 2
    network_guard.clear()
    assert drive.request_log == []


# ---------------------------------------------------------------------------
# GDriveFileSystem basics
# ---------------------------------------------------------------------------


def test_makedirs_is_a_noop_and_folders_appear_on_first_write(fs, drive):
    fs.makedirs("root/ckpts/run-7", exist_ok=True)
    # fsspec's default makedirs does nothing and pydrive2 does not override it.
    assert drive.request_log == []
    assert not fs.exists("root/ckpts/run-7")

    fs.pipe_file("root/ckpts/run-7/a.txt", b"hello world")
    (ckpts,) = drive.find("ckpts", parent="root")
    (run7,) = drive.find("run-7", parent=ckpts["id"])
    assert ckpts["mimeType"] == run7["mimeType"] == FOLDER_MIME
    assert fs.ls("root/ckpts") == ["root/ckpts/run-7/"]
    assert fs.info("root/ckpts/run-7") == {
        "name": "root/ckpts/run-7/",
        "type": "directory",
        "size": 0,
    }
    assert fs.cat_file("root/ckpts/run-7/a.txt") == b"hello world"


def test_put_file_small_info_and_ls(fs, drive, tmp_path):
    data = b"checkpoint bytes " * 100
    local = tmp_path / "ckpt.index"
    local.write_bytes(data)
    drive.clear_log()
    fs.put_file(str(local), "root/ckpts/ckpt.index")

    # pydrive2 always uses a resumable upload: initiate, then one PUT.
    assert uploads(drive) == [
        ("POST", None, 200),
        ("PUT", f"bytes 0-{len(data) - 1}/{len(data)}", 200),
    ]
    init = drive.requests("POST", r"^/upload/")[0]
    assert init.query["uploadType"] == "resumable"
    assert init.headers["x-upload-content-length"] == str(len(data))

    info = fs.info("root/ckpts/ckpt.index")
    assert info == {
        "name": "root/ckpts/ckpt.index",
        "type": "file",
        "size": len(data),
        "checksum": md5(data),  # GDriveFileSystem maps Drive's md5Checksum to "checksum"
    }
    assert fs.ls("root/ckpts", detail=True) == [info]

    (meta,) = drive.find("ckpt.index")
    assert meta["md5Checksum"] == md5(data)
    assert meta["fileSize"] == str(len(data))
    assert meta["labels"]["trashed"] is False
    assert meta["mimeType"] == "application/octet-stream"
    assert meta["downloadUrl"].startswith("https://www.googleapis.com/drive/v2/files/")
    (parent,) = meta["parents"]
    assert parent["id"] == drive.find("ckpts")[0]["id"] and parent["isRoot"] is False


def test_put_file_larger_than_chunk_uses_resumable_chunks(fs, drive, tmp_path):
    data = os.urandom(4 * 256 * KiB + 1000)
    local = tmp_path / "big.bin"
    local.write_bytes(data)
    fs.pipe_file("root/ckpts/warm", b"")  # create folders first
    drive.clear_log()
    with small_upload_chunks(256 * KiB):
        fs.put_file(str(local), "root/ckpts/big.bin")
    total = len(data)
    assert uploads(drive) == [
        ("POST", None, 200),
        ("PUT", f"bytes 0-262143/{total}", 308),
        ("PUT", f"bytes 262144-524287/{total}", 308),
        ("PUT", f"bytes 524288-786431/{total}", 308),
        ("PUT", f"bytes 786432-1048575/{total}", 308),
        ("PUT", f"bytes 1048576-{total - 1}/{total}", 200),
    ]
    assert fs.info("root/ckpts/big.bin")["checksum"] == md5(data)
    assert fs.cat_file("root/ckpts/big.bin") == data
    assert fs.info("root/ckpts/warm")["size"] == 0
    assert fs.info("root/ckpts/warm")["checksum"] == md5(b"")


def test_default_chunk_is_100mib_so_normal_files_go_in_one_put(fs, drive):
    data = os.urandom(3 * MiB + 7)
    fs.pipe_file("root/x/three.bin", data)
    puts = [u for u in uploads(drive) if u[0] == "PUT"]
    assert puts == [("PUT", f"bytes 0-{len(data) - 1}/{len(data)}", 200)]


def test_open_wb_buffers_everything_and_uploads_once_on_close(fs, drive):
    with fs.open("root/x/w.bin", "wb") as f:
        f.write(b"a" * 1000)
        f.write(b"b" * 1000)
        assert drive.requests(path=r"^/upload/") == []  # nothing sent before close
    assert len(drive.requests("PUT", r"^/upload/")) == 1
    assert fs.cat_file("root/x/w.bin") == b"a" * 1000 + b"b" * 1000


def test_cat_file_ranges_are_not_supported_by_pydrive2_but_server_honours_range(
    fs, drive, tmp_path
):
    data = bytes(range(256)) * 4096  # 1 MiB
    fs.pipe_file("root/r/data.bin", data)
    assert fs.cat_file("root/r/data.bin") == data
    # GDriveFileSystem._open("rb") returns a non-seekable IterStream, so
    # fsspec's cat_file(start=..)/cat_file(end=..) die on seek()/tell().
    with pytest.raises(io.UnsupportedOperation):
        fs.cat_file("root/r/data.bin", start=10, end=20)
    with pytest.raises(io.UnsupportedOperation):
        fs.cat_file("root/r/data.bin", end=20)

    # get_file(block_size=) does drive ranged GETs (MediaIoBaseDownload).
    drive.clear_log()
    out = tmp_path / "out.bin"
    fs.get_file("root/r/data.bin", str(out), block_size=300_000)
    assert out.read_bytes() == data
    gets = [
        (r.headers.get("range"), r.status)
        for r in drive.requests("GET")
        if r.query.get("alt") == "media"
    ]
    assert gets == [
        ("bytes=0-299999", 206),
        ("bytes=300000-599999", 206),
        ("bytes=600000-899999", 206),
        ("bytes=900000-1199999", 206),
    ]

    # The Range forms Drive honours, straight through the routed http.
    file_id = drive.find("data.bin")[0]["id"]
    http = make_google_auth(drive).credentials.authorize(make_routed_http(drive))
    url = f"https://www.googleapis.com/drive/v2/files/{file_id}?alt=media"
    for rng, status, body, crange in [
        ("bytes=10-19", 206, data[10:20], f"bytes 10-19/{len(data)}"),
        ("bytes=-5", 206, data[-5:], f"bytes {len(data) - 5}-{len(data) - 1}/{len(data)}"),
        ("bytes=1048570-", 206, data[1048570:], f"bytes 1048570-1048575/{len(data)}"),
        ("bytes=2000000-2000010", 416, None, f"bytes */{len(data)}"),
    ]:
        resp, content = http.request(url, headers={"Range": rng})
        assert (resp.status, resp["content-range"]) == (status, crange), rng
        if body is not None:
            assert content == body
    resp, content = http.request(url)
    assert resp.status == 200 and content == data


def test_empty_file_roundtrip(fs, drive, tmp_path):
    fs.pipe_file("root/e/empty", b"")
    assert fs.cat_file("root/e/empty") == b""
    out = tmp_path / "empty"
    fs.get_file("root/e/empty", str(out))  # MediaIoBaseDownload expects 416 here
    assert out.read_bytes() == b""
    assert (
        "GET",
        416,
    ) in [(r.method, r.status) for r in drive.request_log]


def test_rm_trashes_by_default_and_deletes_with_trash_only_false(drive):
    fs = make_gdrive_fs(drive)
    fs.pipe_file("root/d/a", b"1")
    fs.pipe_file("root/d/b", b"2")
    fs.rm("root/d/a")
    assert drive.requests("POST", r"/trash$")
    (a,) = drive.find("a")
    assert a["labels"]["trashed"] is True and a["explicitlyTrashed"] is True
    assert fs.ls("root/d") == ["root/d/b"]

    fs2 = make_gdrive_fs(drive, trash_only=False)
    fs2.rm("root/d/b")
    assert drive.requests("DELETE")
    assert drive.find("b") == []
    assert fs2.ls("root/d") == []


def test_rm_recursive_on_a_directory(fs, drive):
    fs.pipe_file("root/t/sub/a", b"1")
    fs.pipe_file("root/t/sub/b", b"2")
    fs.rm("root/t/sub", recursive=True)
    assert fs.ls("root/t") == []
    assert all(f["labels"]["trashed"] for f in drive.find(parent=drive.find("sub")[0]["id"]))


def test_mv_patches_title_and_parents(fs, drive):
    fs.pipe_file("root/m/src/a.bin", b"x")
    fs.pipe_file("root/m/dst/keep", b"y")
    fs.mv("root/m/src/a.bin", "root/m/dst/b.bin")
    assert drive.requests("PATCH")
    (b,) = drive.find("b.bin")
    assert b["parents"][0]["id"] == drive.find("dst")[0]["id"]
    assert drive.content(b["id"]) == b"x"


# ---------------------------------------------------------------------------
# Drive quirks: duplicate titles, trash
# ---------------------------------------------------------------------------


def test_writing_the_same_path_twice_creates_two_files(fs, drive):
    fs.pipe_file("root/dup/ckpt", b"first")
    fs.pipe_file("root/dup/ckpt", b"second!")
    files = drive.find("ckpt")
    assert len(files) == 2 and files[0]["id"] != files[1]["id"]
    by_id = {f["id"]: drive.content(f["id"]) for f in files}

    # ls shows both, under the same name.
    assert sorted((e["name"], e["size"]) for e in fs.ls("root/dup", detail=True)) == [
        ("root/dup/ckpt", 5),
        ("root/dup/ckpt", 7),
    ]
    # info / cat pick min(ids) -- lexicographically smallest id, which is
    # neither "oldest" nor "newest" (Drive ids are random).
    chosen = min(by_id)
    assert fs.info("root/dup/ckpt")["checksum"] == md5(by_id[chosen])
    assert fs.cat_file("root/dup/ckpt") == by_id[chosen]

    # rm removes ONE of them (the same min-id one) and leaves the other visible.
    fs.rm("root/dup/ckpt")
    remaining = drive.find("ckpt", trashed=False)
    assert [f["id"] for f in remaining] == [i for i in by_id if i != chosen]
    assert fs.exists("root/dup/ckpt")
    assert fs.cat_file("root/dup/ckpt") == by_id[remaining[0]["id"]]
    fs.rm("root/dup/ckpt")
    assert not fs.exists("root/dup/ckpt")


def test_duplicate_folders_are_merged_by_pydrive2(fs, drive):
    one = drive.create_folder("run")
    two = drive.create_folder("run")
    drive.create_file("a", b"A", parent=one)
    drive.create_file("b", b"B", parent=two)
    assert sorted(fs.ls("root/run")) == ["root/run/a", "root/run/b"]
    # Both folder ids are queried in one files.list.
    q = drive.requests("GET", r"^/drive/v2/files$")[-1].query["q"]
    assert f"'{one}' in parents" in q and f"'{two}' in parents" in q
    # New files go to min(folder ids).
    fs.pipe_file("root/run/c", b"C")
    assert drive.find("c")[0]["parents"][0]["id"] == min(one, two)


def test_trashed_files_are_ignored_by_listing(fs, drive):
    folder = drive.create_folder("t")
    live = drive.create_file("live", b"1", parent=folder)
    dead = drive.create_file("dead", b"2", parent=folder)
    drive.trash(dead)
    assert fs.ls("root/t") == ["root/t/live"]
    assert not fs.exists("root/t/dead")
    with pytest.raises(FileNotFoundError):
        fs.info("root/t/dead")

    # Drive v2 only hides trashed files when the query says so.
    gd = GoogleDrive(make_google_auth(drive))

    def titles(q):
        return sorted(f["title"] for f in gd.ListFile({"q": q}).GetList())

    assert titles(f"'{folder}' in parents") == ["dead", "live"]
    assert titles(f"'{folder}' in parents and trashed=true") == ["dead"]
    assert titles(f"'{folder}' in parents and trashed = false") == ["live"]

    # Trashing a folder implicitly trashes its children; untrash restores them.
    drive.trash(folder)
    assert drive.metadata(live)["labels"]["trashed"] is True
    assert drive.metadata(live)["explicitlyTrashed"] is False
    assert not make_gdrive_fs(drive).exists("root/t")
    gd.CreateFile({"id": folder}).UnTrash()
    assert drive.metadata(live)["labels"]["trashed"] is False
    assert drive.metadata(dead)["labels"]["trashed"] is True  # explicitly trashed stays


def test_title_match_is_case_insensitive_server_side_and_pydrive2_filters(fs, drive):
    folder = drive.create_folder("c")
    drive.create_file("Foo", b"upper", parent=folder)
    drive.create_file("foo", b"lower", parent=folder)
    gd = GoogleDrive(make_google_auth(drive))
    assert len(gd.ListFile({"q": f"'{folder}' in parents and title='FOO'"}).GetList()) == 2
    assert fs.cat_file("root/c/foo") == b"lower"
    assert fs.cat_file("root/c/Foo") == b"upper"


# ---------------------------------------------------------------------------
# query language, paging
# ---------------------------------------------------------------------------


def test_query_forms(drive):
    gd = GoogleDrive(make_google_auth(drive))
    d = drive.create_folder("q")
    drive.create_file("a.txt", b"", parent=d, mime_type="text/plain")
    drive.create_file("b.bin", b"", parent=d)
    drive.create_file("it's", b"", parent=d)
    drive.create_folder("sub", parent=d)

    def titles(q):
        return sorted(f["title"] for f in gd.ListFile({"q": q}).GetList())

    assert titles(f"'{d}' in parents and (title='a.txt' or title='b.bin')") == ["a.txt", "b.bin"]
    assert titles(f"'{d}' in parents and mimeType='{FOLDER_MIME}'") == ["sub"]
    assert titles(
        f"'{d}' in parents and mimeType != '{FOLDER_MIME}' and not title contains '.'"
    ) == ["it's"]
    assert titles(f"'{d}' in parents and title = 'it\\'s'") == ["it's"]
    assert titles("title contains 'TXT'") == ["a.txt"]
    assert titles("'root' in parents") == ["q"]
    assert titles(f"'{drive.root_id}' in parents") == ["q"]

    with pytest.raises(ApiRequestError) as exc:
        gd.ListFile({"q": "modifiedDate > '2020-01-01T00:00:00'"}).GetList()
    assert exc.value.error["code"] == 400
    assert exc.value.GetField("reason") == "invalid"
    assert exc.value.GetField("location") == "q"
    assert len(drive.unsupported) == 1 and "modifiedDate" in drive.unsupported[0]
    drive.unsupported.clear()


def test_pagination(drive):
    drive.page_size_cap = 3
    folder = drive.create_folder("many")
    for i in range(10):
        drive.create_file(f"f{i:02d}", str(i).encode(), parent=folder)
    fs = make_gdrive_fs(drive)
    drive.clear_log()
    assert sorted(fs.ls("root/many")) == [f"root/many/f{i:02d}" for i in range(10)]
    pages = [r for r in drive.requests("GET", r"^/drive/v2/files$") if r.query["q"].startswith("(")]
    assert len(pages) == 4
    assert "pageToken" not in pages[0].query
    assert all("pageToken" in p.query for p in pages[1:])
    assert all(p.query["maxResults"] == "1000" for p in pages)


def test_maxresults_over_1000_rejected(drive):
    gd = GoogleDrive(make_google_auth(drive))
    with pytest.raises(ApiRequestError) as exc:
        gd.ListFile({"q": "'root' in parents", "maxResults": 1001}).GetList()
    assert exc.value.error["code"] == 400


# ---------------------------------------------------------------------------
# other upload types and the GoogleDrive object API
# ---------------------------------------------------------------------------


def test_multipart_and_simple_uploads(drive):
    from googleapiclient.http import MediaIoBaseUpload

    auth = make_google_auth(drive)
    auth.Authorize()
    files = auth.service.files()
    media = MediaIoBaseUpload(io.BytesIO(b"multi\r\n--part"), "text/plain", resumable=False)
    res = files.insert(
        body={"title": "m.txt", "parents": [{"id": "root"}]}, media_body=media
    ).execute()
    assert (res["title"], res["md5Checksum"], res["mimeType"]) == (
        "m.txt",
        md5(b"multi\r\n--part"),
        "text/plain",
    )
    media = MediaIoBaseUpload(io.BytesIO(b"simple"), "application/x-foo", resumable=False)
    res2 = files.insert(media_body=media).execute()
    assert (res2["title"], res2["fileSize"], res2["mimeType"]) == (
        "Untitled",
        "6",
        "application/x-foo",
    )
    assert [r.query["uploadType"] for r in drive.requests("POST", r"^/upload/")] == [
        "multipart",
        "media",
    ]
    assert drive.content(res["id"]) == b"multi\r\n--part"


def test_google_drive_object_api_roundtrip(drive):
    gd = GoogleDrive(make_google_auth(drive))
    f = gd.CreateFile({"title": "s.txt"})
    f.SetContentString("héllo")
    f.Upload()
    assert f["md5Checksum"] == md5("héllo".encode())

    g = gd.CreateFile({"id": f["id"]})
    assert g.GetContentString() == "héllo"  # FetchMetadata + FetchContent via downloadUrl
    assert drive.requests("GET", f"/drive/v2/files/{f['id']}$")[-1].query["source"] == "downloadUrl"

    g.SetContentString("v2")
    g.Upload()  # files.update with media -> PUT /upload/drive/v2/files/{id} (resumable)
    assert drive.requests("PUT", rf"^/upload/drive/v2/files/{f['id']}$")
    assert drive.content(f["id"]) == b"v2"
    assert g["version"] != f["version"]

    g["title"] = "renamed.txt"
    g.Upload()  # files.patch
    assert drive.metadata(f["id"])["title"] == "renamed.txt"

    g.Trash()
    assert drive.metadata(f["id"])["labels"]["trashed"] is True
    g.UnTrash()
    assert drive.metadata(f["id"])["labels"]["trashed"] is False
    g.Delete()
    assert drive.find("renamed.txt") == []
    with pytest.raises(ApiRequestError) as exc:
        gd.CreateFile({"id": f["id"]}).FetchMetadata()
    assert exc.value.error["code"] == 404
    about = gd.GetAbout()
    assert about["rootFolderId"] == drive.root_id
    root = gd.CreateFile({"id": "root"})  # "root" is an alias of the root folder id
    root.FetchMetadata()
    assert (root["id"], root["mimeType"]) == (drive.root_id, FOLDER_MIME)

    h = gd.CreateFile({"id": drive.create_file("h.bin", b"12345")})
    h.FetchMetadata(fields="fileSize,md5Checksum")  # partial response
    assert dict(h) == {"id": h["id"], "fileSize": "5", "md5Checksum": md5(b"12345")}
    page = gd.ListFile({"q": "title='h.bin'", "fields": "items(id,title),nextPageToken"})
    assert [dict(i) for i in page.GetList()] == [{"id": h["id"], "title": "h.bin"}]


# ---------------------------------------------------------------------------
# etags and If-Match (Drive v2: files.update/patch answer 412 conditionNotMet)
# ---------------------------------------------------------------------------


def _conditional(request, etag):
    """A googleapiclient request sent with ``If-Match: etag``; its answer or its HttpError."""
    from googleapiclient.errors import HttpError

    request.headers["If-Match"] = etag
    try:
        return request.execute()
    except HttpError as exc:
        return exc


def _refused_412(answer) -> bool:
    from googleapiclient.errors import HttpError

    if not isinstance(answer, HttpError) or answer.resp.status != 412:
        return False
    (error,) = json.loads(answer.content)["error"]["errors"]
    return (error["reason"], error["location"], error["locationType"]) == (
        "conditionNotMet",
        "If-Match",
        "header",
    )


def test_etag_changes_with_every_change_and_not_on_reads(drive):
    gd = GoogleDrive(make_google_auth(drive))
    f = gd.CreateFile({"title": "e.txt"})
    f.SetContentString("one")
    f.Upload()
    seen = [f["etag"]]

    def etag() -> str:
        return drive.metadata(f["id"])["etag"]

    g = gd.CreateFile({"id": f["id"]})
    assert g.GetContentString() == "one"  # metadata and content reads
    assert etag() == seen[-1]
    g.SetContentString("two")
    g.Upload()  # content
    seen.append(etag())
    g["title"] = "renamed.txt"
    g.Upload()  # metadata only
    seen.append(etag())
    g.Trash()
    seen.append(etag())
    g.UnTrash()
    seen.append(etag())
    assert len(set(seen)) == len(seen), seen

    folder = drive.create_folder("parent")
    child = drive.create_file("child", b"c", parent=folder)
    before = drive.metadata(child)["etag"]
    drive.trash(folder)  # the child's labels.trashed changes with it
    assert drive.metadata(child)["etag"] != before


def test_files_update_honours_if_match_like_drive_v2(drive):
    from googleapiclient.http import MediaIoBaseUpload

    auth = make_google_auth(drive)
    auth.Authorize()
    files = auth.service.files()
    file_id = drive.create_file("lease.json", b"v1")
    stale = drive.metadata(file_id)["etag"]

    def media(data: bytes, resumable: bool = False):
        return MediaIoBaseUpload(io.BytesIO(data), "application/json", resumable=resumable)

    res = _conditional(files.update(fileId=file_id, body={}, media_body=media(b"v2")), stale)
    assert drive.content(file_id) == b"v2" and res["etag"] != stale
    current = res["etag"]

    # Every form of update refuses a stale etag and changes nothing.
    refused = [
        files.update(fileId=file_id, body={}, media_body=media(b"no")),  # multipart
        files.update(fileId=file_id, body={}, media_body=media(b"no", resumable=True)),
        files.update(fileId=file_id, body={"title": "no"}),  # metadata
        files.patch(fileId=file_id, body={"title": "no"}),
    ]
    for request in refused:
        assert _refused_412(_conditional(request, stale))
    assert drive.content(file_id) == b"v2"
    assert drive.metadata(file_id)["etag"] == current
    assert drive.metadata(file_id)["title"] == "lease.json"

    res = _conditional(files.patch(fileId=file_id, body={"title": "renamed"}), current)
    assert res["title"] == "renamed"
    missing = _conditional(files.update(fileId="1nope", body={}, media_body=media(b"x")), current)
    assert missing.resp.status == 404


def test_a_resumable_update_checks_if_match_again_when_it_completes(drive):
    from googleapiclient.errors import HttpError
    from googleapiclient.http import MediaIoBaseUpload

    auth = make_google_auth(drive)
    auth.Authorize()
    file_id = drive.create_file("lease.json", b"v1")
    etag = drive.metadata(file_id)["etag"]
    body = MediaIoBaseUpload(
        io.BytesIO(os.urandom(512 * KiB)),
        "application/octet-stream",
        chunksize=256 * KiB,
        resumable=True,
    )
    request = auth.service.files().update(fileId=file_id, body={}, media_body=body)
    request.headers["If-Match"] = etag
    request.next_chunk()  # the session started (the etag matched); the first chunk is in
    gd = GoogleDrive(auth)
    meanwhile = gd.CreateFile({"id": file_id})
    meanwhile["title"] = "changed meanwhile"
    meanwhile.Upload()
    with pytest.raises(HttpError) as exc:
        while request.next_chunk()[1] is None:
            pass
    assert _refused_412(exc.value)
    assert drive.content(file_id) == b"v1"


def test_concurrent_if_match_updates_leave_one_winner(drive):
    from googleapiclient.http import MediaIoBaseUpload

    auth = make_google_auth(drive)
    auth.Authorize()
    file_id = drive.create_file("lease.json", b"v0")
    etag = drive.metadata(file_id)["etag"]

    def attempt(i: int):
        files = auth.service.files()
        media = MediaIoBaseUpload(io.BytesIO(b"v%d" % i), "application/json", resumable=False)
        request = files.update(fileId=file_id, body={}, media_body=media)
        request.http = auth.Get_Http_Object()  # httplib2 objects are not thread-safe
        return _conditional(request, etag)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(attempt, range(1, 9)))
    won = [a for a in answers if isinstance(a, dict)]
    assert len(won) == 1
    assert sum(_refused_412(a) for a in answers) == 7
    assert drive.content(file_id) == b"v%d" % (answers.index(won[0]) + 1)


def test_if_match_where_drive_v2_is_not_modelled_is_unsupported(drive):
    auth = make_google_auth(drive)
    auth.Authorize()
    file_id = drive.create_file("x", b"x")
    answer = _conditional(auth.service.files().get(fileId=file_id), '"any"')
    assert answer.resp.status == 400
    assert drive.unsupported and "If-Match on GET" in drive.unsupported[0]
    drive.unsupported.clear()  # seen: the fixture checks that nothing else was


def test_reading_a_folder_fails_after_export_fallback(fs, drive):
    fs.pipe_file("root/dir/a", b"a")
    with pytest.raises(ApiRequestError) as exc:
        fs.cat_file("root/dir")
    assert exc.value.GetField("reason") == "fileNotExportable"
    dir_id = drive.find("dir")[0]["id"]
    assert [(r.path, r.status) for r in drive.requests("GET", f"/files/{dir_id}")] == [
        (f"/drive/v2/files/{dir_id}", 403),  # alt=media: fileNotDownloadable
        (f"/drive/v2/files/{dir_id}/export", 403),  # pydrive2's fallback
    ]


# ---------------------------------------------------------------------------
# paths
# ---------------------------------------------------------------------------


def test_root_prefixed_base_path(drive):
    with pytest.raises(FileNotFoundError):  # the base must already exist
        make_gdrive_fs(drive, "root/ckpts/run-7").ls("root/ckpts/run-7")
    make_gdrive_fs(drive).pipe_file("root/ckpts/run-7/seed", b"s")
    fs = make_gdrive_fs(drive, "root/ckpts/run-7")
    fs.pipe_file("root/ckpts/run-7/step-1/data", b"d")
    assert sorted(fs.ls("root/ckpts/run-7")) == [
        "root/ckpts/run-7/seed",
        "root/ckpts/run-7/step-1/",
    ]
    assert fs.cat_file("root/ckpts/run-7/step-1/data") == b"d"


def test_folder_id_first_path(drive):
    top = drive.create_folder("projects")
    drive.create_folder("ckpts", parent=top)
    fs = make_gdrive_fs(drive, f"{top}/ckpts")
    fs.pipe_file(f"{top}/ckpts/run-7/a.bin", b"abc")
    assert fs.ls(f"{top}/ckpts") == [f"{top}/ckpts/run-7/"]
    assert fs.cat_file(f"{top}/ckpts/run-7/a.bin") == b"abc"
    # A non-"root" bucket triggers the shared-drive probe: files.get(fields=driveId).
    probe = drive.requests("GET", f"^/drive/v2/files/{top}$")[0]
    assert probe.query["fields"] == "driveId"
    lists = drive.requests("GET", r"^/drive/v2/files$")
    assert all(r.query["corpora"] == "default" for r in lists)


# ---------------------------------------------------------------------------
# faults and retries
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, retried",
    [
        ("userRateLimitExceeded", True),  # 403
        ("rateLimitExceeded", True),  # 403
        ("backendError", True),  # 500
        ("429", False),  # pydrive2's retry filter ignores 429, googleapiclient num_retries=0
    ],
)
def test_injected_fault_on_list(fs, drive, kind, retried):
    fs.pipe_file("root/x/a", b"a")
    fs2 = make_gdrive_fs(drive)  # fresh id cache
    drive.clear_log()
    fault = drive.fail_next(1, kind, method="GET", path=r"^/drive/v2/files$")
    if retried:
        assert fs2.ls("root/x") == ["root/x/a"]
    else:
        with pytest.raises(ApiRequestError) as exc:
            fs2.ls("root/x")
        assert exc.value.error["code"] == 429
        assert exc.value.GetField("reason") == "rateLimitExceeded"
    assert fault.served == 1 and drive.fault_counts == {kind: 1}
    statuses = [r.status for r in drive.requests("GET", r"^/drive/v2/files$")]
    first = {"429": 429, "backendError": 500}.get(kind, 403)
    # title lookup of "x" (faulted, then retried by pydrive2.fs) + the listing itself
    assert statuses == ([first, 200, 200] if retried else [first])


def test_rate_limit_during_resumable_upload_restarts_the_upload(fs, drive):
    fs.pipe_file("root/u/warm", b"")
    drive.clear_log()
    data = os.urandom(600 * KiB)
    drive.fail_next(1, "userRateLimitExceeded", method="PUT", path=r"^/upload/")
    with small_upload_chunks(256 * KiB):
        fs.pipe_file("root/u/data", data)
    # The 403 on the first chunk bubbles out of googleapiclient; pydrive2.fs's
    # retry re-runs the whole upload with a new session (no resume).
    assert uploads(drive) == [
        ("POST", None, 200),
        ("PUT", f"bytes 0-262143/{len(data)}", 403),
        ("POST", None, 200),
        ("PUT", f"bytes 0-262143/{len(data)}", 308),
        ("PUT", f"bytes 262144-524287/{len(data)}", 308),
        ("PUT", f"bytes 524288-{len(data) - 1}/{len(data)}", 200),
    ]
    assert len([s for s in drive.sessions() if s.metadata["title"] == "data"]) == 2
    (meta,) = drive.find("data")
    assert meta["md5Checksum"] == md5(data)


def test_fail_rate_knob_counts(drive):
    http = make_google_auth(drive).credentials.authorize(make_routed_http(drive))
    fault = drive.fail_rate(0.5, "429", seed=7)
    statuses = [
        http.request("https://www.googleapis.com/drive/v2/files?q=trashed%3Dfalse")[0].status
        for _ in range(40)
    ]
    assert set(statuses) == {200, 429}
    assert fault.served == statuses.count(429) == drive.fault_counts["429"] == drive.faults_served
    assert 10 < fault.served < 30
    body = drive.request_log[statuses.index(429)]
    assert body.fault == "429"
    drive.clear_faults()
    assert http.request("https://www.googleapis.com/drive/v2/files")[0].status == 200


def test_fault_body_has_drive_error_shape(drive):
    http = make_google_auth(drive).credentials.authorize(make_routed_http(drive))
    drive.fail_next(1, "userRateLimitExceeded")
    resp, content = http.request("https://www.googleapis.com/drive/v2/files")
    assert resp.status == 403
    assert json.loads(content) == {
        "error": {
            "errors": [
                {
                    "domain": "usageLimits",
                    "reason": "userRateLimitExceeded",
                    "message": "User Rate Limit Exceeded",
                }
            ],
            "code": 403,
            "message": "User Rate Limit Exceeded",
        }
    }


# ---------------------------------------------------------------------------
# concurrency and memory
# ---------------------------------------------------------------------------


def test_concurrent_puts_into_a_new_dir_create_one_folder(fs, drive):
    blobs = {f"root/conc/run/f{i}": os.urandom(1000 + i) for i in range(8)}
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: fs.pipe_file(*kv), blobs.items()))
    assert len(drive.find("conc")) == 1
    assert len(drive.find("run")) == 1
    for path, data in blobs.items():
        assert fs.info(path)["checksum"] == md5(data)


_MEM_CHILD = textwrap.dedent(
    """
    import json, resource, sys, time, tracemalloc
    sys.path.insert(0, sys.argv[1])
    import fake_drive as fdm

    def hwm_kib():
        try:
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    class Srv:
        url, access_token = sys.argv[2], sys.argv[3]

    with fdm.block_external_network():
        fs = fdm.make_gdrive_fs(Srv())
        fs.pipe_file("root/mem/warm.bin", b"x" * 1000)  # imports, folders, sockets
        base = hwm_kib()
        tracemalloc.start()
        t = time.time()
        fs.put_file(sys.argv[4], "root/mem/big.bin")
        secs = time.time() - t
        tm_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(json.dumps({"base_kib": base, "hwm_kib": hwm_kib(), "tm_peak": tm_peak,
                          "secs": secs}))
    """
)


def test_put_file_100mib_streams_from_disk(drive, tmp_path):
    size = 100 * MiB
    local = tmp_path / "big.bin"
    h = hashlib.md5()
    with open(local, "wb") as f:
        block = os.urandom(MiB)
        for i in range(size // MiB):
            chunk = block[i:] + block[:i]
            h.update(chunk)
            f.write(chunk)
    child = tmp_path / "child.py"
    child.write_text(_MEM_CHILD)
    here = str(Path(__file__).resolve().parent)
    t = time.time()
    out = subprocess.run(
        [sys.executable, str(child), here, drive.url, drive.access_token, str(local)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    grew = (res["hwm_kib"] - res["base_kib"]) * KiB
    print(
        f"100 MiB put_file: peak RSS +{grew / MiB:.1f} MiB, tracemalloc peak "
        f"{res['tm_peak'] / MiB:.2f} MiB, {res['secs']:.2f}s (wall {time.time() - t:.1f}s)"
    )
    # Streamed from the file in small blocks: nowhere near 100 MiB resident.
    assert grew < 32 * MiB, res
    assert res["tm_peak"] < 8 * MiB, res
    (meta,) = drive.find("big.bin")
    assert meta["fileSize"] == str(size) and meta["md5Checksum"] == h.hexdigest()
    puts = [u for u in uploads(drive) if u[0] == "PUT"][-1:]
    assert puts == [("PUT", f"bytes 0-{size - 1}/{size}", 200)]  # exactly one 100 MiB chunk
