"""resolve_corpus against a local HTTP server: nothing here touches the real network."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import socket
import threading
import zipfile
from pathlib import Path

import pytest

from mingpt_palm import download
from mingpt_palm.errors import UserError
from mingpt_palm.download import CORPORA, Source, resolve_corpus

TEXT = b"<mediawiki>\n" + bytes(range(256)) * 40 + b"the end\n"


def _zip_bytes(member: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member, data)
    return buf.getvalue()


ZIP = _zip_bytes("toy", TEXT)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.hits.append(self.path)
        if self.path == "/toy.zip":
            self._send(ZIP)
        elif self.path == "/input.txt":
            self._send(TEXT)
        elif self.path == "/cut/toy.zip":
            # Promise the whole zip, send half, hang up: a connection dropped midway.
            self.send_response(200)
            self.send_header("Content-Length", str(len(ZIP)))
            self.end_headers()
            self.wfile.write(ZIP[: len(ZIP) // 2])
            self.wfile.flush()
            self.close_connection = True
        elif self.path == "/boom/toy.zip":
            self.send_error(500)
        else:
            self.send_error(404)

    def _send(self, body: bytes):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _Server:
    def __init__(self):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.hits = []
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.running = True

    @property
    def hits(self) -> list[str]:
        return self.httpd.hits

    def stop(self):
        if self.running:
            self.running = False
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join(timeout=5)


@pytest.fixture
def server(request):
    srv = _Server()
    request.addfinalizer(srv.stop)
    return srv


def _dead_url(path: str) -> str:
    # A port that was free a moment ago: connecting to it is refused, just like being offline.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{path}"


def _toy(url: str, **changes) -> dict[str, Source]:
    corpus = Source(
        name="toy",
        url=url,
        sha256=hashlib.sha256(ZIP).hexdigest(),
        size=len(ZIP),
        member="toy",
        split_bytes=None,
        member_size=len(TEXT),
    )
    corpus = Source(**{**corpus.__dict__, **changes})
    return {"toy": corpus}


def _plain(url: str) -> dict[str, Source]:
    sha = hashlib.sha256(TEXT).hexdigest()
    return {"plain": Source("plain", url, sha, len(TEXT), None, None)}


def _listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.exists() else []


def test_real_corpora_are_pinned():
    enwik8 = CORPORA["enwik8"]
    assert enwik8.url == "http://mattmahoney.net/dc/enwik8.zip"
    assert (enwik8.size, enwik8.member, enwik8.member_size) == (36_445_475, "enwik8", 10**8)
    assert enwik8.split_bytes == (90_000_000, 5_000_000, 5_000_000)
    assert sum(enwik8.split_bytes) == enwik8.member_size
    shakespeare = CORPORA["tinyshakespeare"]
    assert (shakespeare.size, shakespeare.member, shakespeare.split_bytes) == (1_115_394, None, None)
    for corpus in CORPORA.values():
        assert len(corpus.sha256) == 64 and int(corpus.sha256, 16) >= 0


def test_download_unpack_then_reuse_offline(server, tmp_path):
    corpora = _toy(server.url + "/toy.zip")
    path, corpus = resolve_corpus("toy", tmp_path, corpora=corpora, progress=True)
    assert path == tmp_path / "toy" / "toy"
    assert path.read_bytes() == TEXT
    assert corpus is corpora["toy"]
    assert _listing(tmp_path / "toy") == ["toy", "toy.zip"]  # no temp files left behind
    assert server.hits == ["/toy.zip"]

    server.stop()
    again, _ = resolve_corpus("toy", tmp_path, corpora=corpora, progress=False)
    assert again == path and again.read_bytes() == TEXT


def test_plain_file_download(server, tmp_path):
    path, _ = resolve_corpus("plain", tmp_path, corpora=_plain(server.url + "/input.txt"),
                             progress=False)
    assert path == tmp_path / "plain" / "input.txt"
    assert path.read_bytes() == TEXT
    assert _listing(tmp_path / "plain") == ["input.txt"]


def test_wrong_checksum_leaves_nothing(server, tmp_path):
    corpora = _toy(server.url + "/toy.zip", sha256="0" * 64)
    with pytest.raises(UserError) as err:
        resolve_corpus("toy", tmp_path, corpora=corpora, progress=False)
    message = str(err.value)
    assert "\n" not in message
    assert server.url + "/toy.zip" in message and "sha256" in message
    assert "toy.zip" in message and "pass the path" in message
    assert _listing(tmp_path / "toy") == []


def test_connection_dropped_midway_leaves_nothing(server, tmp_path):
    corpora = _toy(server.url + "/cut/toy.zip")
    with pytest.raises(UserError, match="expected") as err:
        resolve_corpus("toy", tmp_path, corpora=corpora, progress=False)
    assert "\n" not in str(err.value) and "/cut/toy.zip" in str(err.value)
    assert _listing(tmp_path / "toy") == []


@pytest.mark.parametrize("path, code", [("/missing/toy.zip", "404"), ("/boom/toy.zip", "500")])
def test_http_errors(server, tmp_path, path, code):
    with pytest.raises(UserError, match=code) as err:
        resolve_corpus("toy", tmp_path, corpora=_toy(server.url + path), progress=False)
    assert "\n" not in str(err.value) and server.url + path in str(err.value)
    assert _listing(tmp_path / "toy") == []


def test_offline(tmp_path):
    url = _dead_url("toy.zip")
    with pytest.raises(UserError, match="no connection") as err:
        resolve_corpus("toy", tmp_path / "datasets", corpora=_toy(url), progress=False)
    assert url in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []  # no empty datasets/toy/ left behind by the refused fetch


def test_interrupt_removes_temp_file(tmp_path, monkeypatch):
    class Interrupted:
        def __init__(self):
            self.reads = 0

        def read(self, n):
            self.reads += 1
            if self.reads > 1:
                raise KeyboardInterrupt
            return ZIP[:10]

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(download.urllib.request, "urlopen", lambda *a, **k: Interrupted())
    with pytest.raises(KeyboardInterrupt):
        resolve_corpus("toy", tmp_path, corpora=_toy("http://example.invalid/toy.zip"),
                       progress=False)
    assert _listing(tmp_path / "toy") == []


def test_hand_placed_zip_works_offline(tmp_path):
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "toy.zip").write_bytes(ZIP)
    path, _ = resolve_corpus("toy", tmp_path, corpora=_toy(_dead_url("toy.zip")), progress=False)
    assert path.read_bytes() == TEXT


def test_hand_placed_unpacked_file_works_offline(tmp_path):
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "toy").write_bytes(TEXT)
    path, _ = resolve_corpus("toy", tmp_path, corpora=_toy(_dead_url("toy.zip")), progress=False)
    assert path == tmp_path / "toy" / "toy"
    assert _listing(tmp_path / "toy") == ["toy"]


def test_hand_placed_bad_files_are_refused_but_kept(tmp_path):
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "toy.zip").write_bytes(ZIP[:-1] + b"x")
    with pytest.raises(UserError, match="sha256"):
        resolve_corpus("toy", tmp_path, corpora=_toy(_dead_url("toy.zip")), progress=False)
    (folder / "toy").write_bytes(TEXT[:-1])
    with pytest.raises(UserError, match="expected"):
        resolve_corpus("toy", tmp_path, corpora=_toy(_dead_url("toy.zip")), progress=False)
    assert _listing(folder) == ["toy", "toy.zip"]  # the user's files are theirs to delete


def test_zip_without_the_member(server, tmp_path):
    corpora = _toy(server.url + "/toy.zip", member="enwik8")
    with pytest.raises(UserError, match="enwik8"):
        resolve_corpus("toy", tmp_path, corpora=corpora, progress=False)
    assert _listing(tmp_path / "toy") == ["toy.zip"]  # the verified download is kept


def test_path_wins_over_name(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("toy").write_bytes(b"my own text")
    path, corpus = resolve_corpus("toy", tmp_path / "datasets",
                                  corpora=_toy(server.url + "/toy.zip"), progress=False)
    assert (path, corpus) == (Path("toy"), None)
    assert server.hits == []


def test_directory_named_like_a_corpus_means_the_corpus(tmp_path, monkeypatch):
    # e.g. running from inside datasets/: "toy" is both a folder here and a registered name.
    monkeypatch.chdir(tmp_path)
    Path("toy").mkdir()
    Path("toy", "toy").write_bytes(TEXT)
    path, corpus = resolve_corpus("toy", ".", corpora=_toy(_dead_url("toy.zip")), progress=False)
    assert path == Path("toy", "toy") and corpus is not None


def test_directory_empty_file_and_unknown_name(tmp_path):
    corpora = _toy(_dead_url("toy.zip"))
    with pytest.raises(UserError, match="is a directory"):
        resolve_corpus(str(tmp_path), tmp_path, corpora=corpora)
    empty = tmp_path / "empty.txt"
    empty.touch()
    with pytest.raises(UserError, match="is empty"):
        resolve_corpus(str(empty), tmp_path, corpora=corpora)
    with pytest.raises(UserError, match=r"registered: enwik8, tinyshakespeare\)"):
        resolve_corpus("no/such/file.txt", tmp_path)
    assert not (tmp_path / "no").exists()
