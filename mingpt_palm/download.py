"""Named corpora: fetched once into datasets/<name>/, verified, unpacked.

`resolve_corpus("enwik8")` gives the path of the unpacked 10^8-byte file, downloading and checking
it on first use; `resolve_corpus("my.txt")` gives that file back untouched. Nothing that has not
passed its size and checksum is ever put under its final name, so a later run can trust whatever
it finds there and work offline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import os
import posixpath
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from mingpt_palm.errors import UserError

_CHUNK = 1 << 20
_TIMEOUT_S = 60  # per socket operation: a stalled server fails instead of hanging the run


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a registered corpus comes from and how it is checked (data.Corpus is a loaded one)."""

    name: str
    url: str
    sha256: str  # of the downloaded file (the zip for enwik8)
    size: int  # bytes of the downloaded file
    member: str | None  # file to extract from a zip; None when the download is the corpus itself
    split_bytes: tuple[int, int, int] | None  # standard (train, val, test) sizes; None -> fractions
    member_size: int | None = None  # bytes of the unpacked member, checked when reusing it

    @property
    def filename(self) -> str:
        """Name the download is stored under: the last part of the URL (enwik8.zip, input.txt)."""
        return posixpath.basename(urllib.parse.urlsplit(self.url).path)

    @property
    def corpus_filename(self) -> str:
        return posixpath.basename(self.member) if self.member else self.filename

    @property
    def corpus_size(self) -> int | None:
        return self.member_size if self.member else self.size


CORPORA: dict[str, Source] = {
    # Hutter-prize file: the first 10^8 bytes of the 2006-03-03 English Wikipedia dump. Zip size
    # and sha256 as pinned by huggingface/datasets (datasets/enwik8/dataset_infos.json); the
    # member's 10^8 bytes are Matt Mahoney's published size (md5 a1fa5ffddb56f4953e226637dabbb36a).
    "enwik8": Source(
        name="enwik8",
        url="http://mattmahoney.net/dc/enwik8.zip",
        sha256="547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc",
        size=36_445_475,
        member="enwik8",
        split_bytes=(90_000_000, 5_000_000, 5_000_000),
        member_size=100_000_000,
    ),
    "tinyshakespeare": Source(
        name="tinyshakespeare",
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        size=1_115_394,
        member=None,
        split_bytes=None,
    ),
}


def resolve_corpus(
    path_or_name: str,
    datasets_dir: str | Path = "datasets",
    *,
    corpora: dict[str, Source] = CORPORA,
    progress: bool = True,
) -> tuple[Path, Source | None]:
    """A path to an existing file wins (returns (path, None)); else a registered name is fetched once
    into datasets/<name>/ and the unpacked file's path is returned with its Source; else UserError."""
    path = Path(path_or_name)
    if path.is_file():
        if path.stat().st_size == 0:
            raise UserError(f"{path} is empty: a corpus needs at least one byte of text")
        return path, None
    # A directory (or a FIFO, a device) can never be a corpus, so when it shares a registered name the
    # name is meant.
    if path.is_dir() and path_or_name not in corpora:
        raise UserError(f"{path} is a directory; pass a text file or one of: {_names(corpora)}")
    if path.exists() and path_or_name not in corpora:
        raise UserError(f"{path} is not a regular file (a FIFO, device or socket cannot be memory-mapped and "
                        f"split); pass a text file or one of: {_names(corpora)}")
    if path_or_name not in corpora:
        raise UserError(
            f"{path_or_name!r} is neither an existing file nor a registered corpus "
            f"(registered: {_names(corpora)})"
        )
    corpus = corpora[path_or_name]
    folder = Path(datasets_dir) / corpus.name
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # what a failed fetch takes back
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return _fetch(corpus, folder, progress)
    except BaseException:
        for empty in made:  # innermost first; rmdir leaves anything that holds a file
            with contextlib.suppress(OSError):
                empty.rmdir()
        raise


def _fetch(corpus: Source, folder: Path, progress: bool) -> tuple[Path, Source]:
    target = folder / corpus.corpus_filename
    if target.exists():
        _check_size(target, corpus.corpus_size, corpus)
        return target, corpus

    archive = folder / corpus.filename
    if archive.exists():  # checked again: it may have been placed by hand
        _verify_placed(archive, corpus)
    else:
        _download(corpus, archive, progress)
    if corpus.member:
        _extract(archive, corpus, target, progress)
    return target, corpus


def _names(corpora: dict[str, Source]) -> str:
    return ", ".join(sorted(corpora)) or "none"


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _instead(corpus: Source, folder: Path) -> str:
    unpacked = f" or the unpacked {corpus.corpus_filename}" if corpus.member else ""
    return (
        f"put {corpus.filename}{unpacked} into {folder}/ by hand, "
        f"or pass the path of a text file instead"
    )


def _check_size(path: Path, expected: int | None, corpus: Source) -> None:
    size = path.stat().st_size
    if size == 0 or (expected is not None and size != expected):
        want = f"{expected:,}" if expected is not None else "more than 0"
        raise UserError(
            f"{path} has {size:,} bytes, expected {want} for {corpus.name}; "
            f"delete it and run again, or replace it with a good copy"
        )


def _verify_placed(archive: Path, corpus: Source) -> None:
    _check_size(archive, corpus.size, corpus)
    digest = hashlib.sha256()
    with archive.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != corpus.sha256:
        raise UserError(
            f"{archive} has sha256 {digest.hexdigest()}, expected {corpus.sha256}; "
            f"delete it to download again, or replace it with a good copy"
        )


def _stream(src: BinaryIO, dst: BinaryIO, total: int | None, desc: str, progress: bool):
    """Copy src to dst in chunks with a progress bar; returns (bytes copied, sha256 hex)."""
    digest, count = hashlib.sha256(), 0
    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
              disable=not progress) as bar:
        while chunk := src.read(_CHUNK):
            dst.write(chunk)
            digest.update(chunk)
            count += len(chunk)
            bar.update(len(chunk))
    return count, digest.hexdigest()


def _temp_beside(dest: Path) -> tuple[int, Path]:
    # Same directory as dest so os.replace is an atomic rename, hidden and suffixed so that no
    # later run mistakes it for the real thing.
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.chmod(name, 0o644)  # mkstemp makes it 0600; a dataset should be readable like any file
    return fd, Path(name)


def _download(corpus: Source, dest: Path, progress: bool) -> None:
    def fail(reason: str) -> UserError:
        return UserError(
            f"could not download {corpus.name} from {corpus.url}: {_one_line(reason)}; "
            f"{_instead(corpus, dest.parent)}"
        )

    fd, tmp = _temp_beside(dest)
    try:  # the finally removes the temp file on every failure, KeyboardInterrupt included
        with os.fdopen(fd, "wb") as out:
            request = urllib.request.Request(corpus.url, headers={"User-Agent": "mingpt-palm"})
            try:
                with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
                    count, sha = _stream(response, out, corpus.size, corpus.filename, progress)
            except urllib.error.HTTPError as e:
                e.close()
                raise fail(f"the server answered HTTP {e.code} {e.reason}") from None
            except urllib.error.URLError as e:
                raise fail(f"no connection ({e.reason})") from None
            except (OSError, http.client.HTTPException) as e:
                raise fail(f"the transfer failed ({type(e).__name__}: {e})") from None
        # http.client returns a short body without complaint when the server hangs up early,
        # so the size check is what catches a dropped connection.
        if count != corpus.size:
            raise fail(f"got {count:,} bytes, expected {corpus.size:,} (connection cut short?)")
        if sha != corpus.sha256:
            raise fail(f"sha256 {sha} does not match the expected {corpus.sha256}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _extract(archive: Path, corpus: Source, target: Path, progress: bool) -> None:
    def fail(reason: object) -> UserError:
        return UserError(
            f"could not unpack {corpus.member} from {archive}: {_one_line(reason)}; if the zip is "
            f"damaged delete it to download again, or {_instead(corpus, archive.parent)}"
        )

    fd, tmp = _temp_beside(target)
    try:
        try:
            # zipfile checks the member's CRC as the read reaches its end.
            with os.fdopen(fd, "wb") as out, zipfile.ZipFile(archive) as zf, \
                    zf.open(corpus.member) as src:
                count, _ = _stream(src, out, corpus.member_size, f"unpack {target.name}", progress)
        except (KeyError, zipfile.BadZipFile, OSError) as e:
            raise fail(e) from None
        if count == 0 or corpus.member_size not in (None, count):
            raise fail(f"it has {count:,} bytes, expected {corpus.member_size or 'at least 1'}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
