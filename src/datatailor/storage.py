"""Where a run's files live: a local folder, or an object store (`s3://`, `gs://`, `abfs://`, any fsspec URL).

`RunStore` is a run directory seen as named objects (paths relative to its root): whole objects (written once,
or replaced whole) and **journals** (append-only JSONL files). On a local disk a journal is one file appended
to; in an object store, where nothing can be appended, it is a series of write-once **segments**
(`<name>.log/<generation>-<start offset>`), each holding the bytes appended since the previous one. Reading a
journal concatenates the newest generation's segments in order; a rewritten journal (compaction) starts a new
generation, so a segment of an older one is never mixed in.

Object storage needs fsspec and the store's package (`pip install 'datatailor[cloud]'`: s3fs, gcsfs, adlfs),
imported only when a URL is used. Credentials come from where those packages look (environment variables
such as AWS_ACCESS_KEY_ID / AWS_PROFILE / AWS_ENDPOINT_URL, profiles, instance roles); a URL that carries
credentials itself is refused, so they are never written to a run directory or a log.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from datatailor.errors import UserError
from datatailor.io import atomic_open

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_SEGMENT = re.compile(r"^(\d{6})-(\d{12})$")
LOG = ".log"  # a journal `name` is stored as segments under `name.log/`
SEGMENT_BYTES = 64 << 20  # the most a journal segment holds (a longer line makes a longer one)
UPLOAD_BLOCK = 16 << 20  # what an upload holds in memory at a time: its multipart part size
MAX_PARTS = 9_000  # under S3's 10,000 parts to an object: a larger file gets larger parts
READ_BLOCK = 8 << 20  # a journal segment is read in ranges of this size


def is_url(location: str | Path) -> bool:
    """True for an object-store or other fsspec URL (`s3://…`); False for a local path (or `file://`)."""
    m = _SCHEME.match(str(location))
    return bool(m) and m.group(1).lower() != "file"


def check_url(url: str) -> str:
    """The URL, refused when it carries credentials (`s3://KEY:SECRET@bucket/…`): they would end up in the run
    directory's manifest and in logs. Give them the usual way (environment variables, profiles, roles)."""
    parts = urlsplit(url)
    if "@" in parts.netloc:
        raise UserError(f"{parts.scheme}://…@{parts.netloc.rsplit('@', 1)[1]}: a URL must not carry credentials; "
                        "give them the usual way (e.g. AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)")
    return url


def url_filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for a URL; a missing package is a UserError naming the extra."""
    check_url(url)
    try:
        import fsspec
    except ImportError:
        raise UserError(f"{url}: object storage needs fsspec: pip install 'datatailor[cloud]'") from None
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        raise UserError(f"{url}: {exc} (pip install 'datatailor[cloud]')") from None
    except ValueError as exc:
        raise UserError(f"{url}: {exc}") from None


def object_identity(url: str) -> str:
    """What identifies an object's content without reading it: its ETag (or checksum) and size."""
    fs, path = url_filesystem(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise UserError(f"input not found: {url}") from None
    tag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("content_settings") or ""
    if not tag:
        tag = fs.checksum(path)
    return f"{str(tag).strip(chr(34))}:{info.get('size')}"


def open_input(url: str, mode: str = "rb") -> Any:
    """A URL opened for streaming reads (fsspec reads it in blocks: bounded memory)."""
    fs, path = url_filesystem(url)
    try:
        if not fs.isfile(path):
            raise UserError(f"input not found: {url}")
        return fs.open(path, mode, **({"encoding": "utf-8"} if "b" not in mode else {}))
    except FileNotFoundError:
        raise UserError(f"input not found: {url}") from None
    except PermissionError as exc:
        raise UserError(f"{url}: access denied ({exc}); check the credentials in the environment") from None


def segment_name(generation: int, start: int) -> str:
    return f"{generation:06d}-{start:012d}"


class RunStore:
    """A run directory's objects, by path relative to `root` (a local folder or a URL)."""

    def __init__(self, root: str | Path):
        self.root = str(root).rstrip("/")
        self.remote = is_url(self.root)
        if self.remote:
            self.fs, self._base = url_filesystem(self.root)
            self._base = self._base.rstrip("/")
        else:
            self.fs, self._base = None, self.root
        self.bytes_written = 0  # by this process, through this store (what a benchmark reports)

    def __repr__(self) -> str:
        return f"RunStore({self.root!r})"

    def path(self, rel: str) -> str:
        return f"{self._base}/{rel}" if rel else self._base

    def url(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    # -- whole objects -------------------------------------------------------------------------------

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole object: atomically (temp file and rename) on a disk, one PUT in a store."""
        self.bytes_written += len(data)
        if self.remote:
            self.fs.pipe_file(self.path(rel), data)
            return
        with atomic_open(self.path(rel), "wb") as fh:
            fh.write(data)

    def put_file(self, local: Path, rel: str) -> None:
        """Copy a local file to object `rel`, streamed (see `upload`)."""
        with local.open("rb") as fh:
            self.upload(rel, fh, os.fstat(fh.fileno()).st_size)

    def upload(self, rel: str, src: IO[bytes], size: int) -> None:
        """Write the next `size` bytes of `src` as the whole object `rel`, holding about one `UPLOAD_BLOCK` in
        memory whatever the size (fsspec's put_file reads up to 10 parts of 50 MB at once, and pipe_file needs
        the whole object as bytes). The object appears only when complete: one PUT, or a multipart upload that
        is aborted on an error; on a disk, a temp file renamed."""
        self.bytes_written += size
        if not self.remote:
            with atomic_open(self.path(rel), "wb") as fh:
                _copy(src, fh, size, rel)
            return
        out = self.fs.open(self.path(rel), "wb", block_size=max(UPLOAD_BLOCK, -(-size // MAX_PARTS)))
        try:
            _copy(src, out, size, rel)
        except BaseException:
            out.discard()  # aborts the multipart upload: nothing appears
            out.closed = True  # so that closing it (or collecting it) does not try to finish the upload
            raise
        out.close()

    def download(self, rel: str, target: Path) -> None:
        """Copy object `rel` to a local file, streamed."""
        import shutil

        target.parent.mkdir(parents=True, exist_ok=True)
        with self.open_read(rel) as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)

    def read_bytes(self, rel: str) -> bytes | None:
        try:
            if self.remote:
                return self.fs.cat_file(self.path(rel))
            return Path(self.path(rel)).read_bytes()
        except FileNotFoundError:
            return None

    def open_read(self, rel: str) -> Any:
        """A whole object opened for streaming reads (binary)."""
        return self.fs.open(self.path(rel), "rb") if self.remote else open(self.path(rel), "rb")

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel)) if self.remote else os.path.exists(self.path(rel))

    def list(self, prefix: str) -> list[str]:
        """Every object under `prefix` (recursively), as paths relative to the root, sorted."""
        return sorted(self.sizes(prefix))

    def sizes(self, prefix: str) -> dict[str, int]:
        """Every object under `prefix` (recursively) and its size in bytes, by path relative to the root (one
        listing: no request per object)."""
        base = self.path(prefix)
        strip = len(self._base) + 1
        if self.remote:
            self.fs.invalidate_cache()
            try:
                found = self.fs.find(base, detail=True)
            except FileNotFoundError:
                return {}
            return {p[strip:]: int(info.get("size") or 0) for p, info in found.items()}
        root = Path(base)
        if not root.exists():
            return {}
        found_here: dict[str, int] = {}
        for p in root.rglob("*"):
            try:
                st = p.stat()
            except FileNotFoundError:  # renamed or deleted by a writer while we looked
                continue
            if stat.S_ISREG(st.st_mode):
                found_here[str(p)[strip:]] = st.st_size
        return found_here

    def delete(self, prefix: str) -> None:
        """Delete an object, or everything under a prefix."""
        target = self.path(prefix)
        if self.remote:
            try:
                self.fs.rm(target, recursive=True)
            except FileNotFoundError:
                pass
            return
        p = Path(target)
        if p.is_dir():
            import shutil

            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)

    # -- journals --------------------------------------------------------------------------------------

    def segments(self, rel: str) -> list[tuple[int, int, str]]:
        """(generation, start, object path) of a journal's segments, oldest first."""
        return [seg[:3] for seg in self._segments(rel)]

    def _segments(self, rel: str) -> list[tuple[int, int, str, int]]:
        """(generation, start, object path, size) of a journal's segments, oldest first."""
        out = []
        for name, size in self.sizes(rel + LOG).items():
            m = _SEGMENT.match(name.rsplit("/", 1)[-1])
            if m:
                out.append((int(m.group(1)), int(m.group(2)), name, size))
        return sorted(out)

    def append_segment(self, rel: str, generation: int, start: int, data: bytes) -> None:
        """Write bytes appended to journal `rel` from offset `start` as one write-once segment."""
        self.write_bytes(f"{rel}{LOG}/{segment_name(generation, start)}", data)

    def upload_segment(self, rel: str, generation: int, start: int, src: IO[bytes], size: int) -> None:
        """`append_segment` of the next `size` bytes of `src`, streamed (see `upload`)."""
        self.upload(f"{rel}{LOG}/{segment_name(generation, start)}", src, size)

    def journal_chunks(self, rel: str) -> Iterator[bytes]:
        """A journal's bytes, in order: the local file, or the newest generation's contiguous segments (a gap,
        left by a writer killed between two uploads, ends it: what follows cannot be placed)."""
        if not self.remote:
            p = Path(self.path(rel))
            if p.exists():
                with p.open("rb") as fh:
                    while chunk := fh.read(1 << 20):
                        yield chunk
            return
        segs = self._segments(rel)
        if not segs:
            return
        newest = segs[-1][0]
        at = 0
        for gen, start, name, size in segs:
            if gen != newest:
                continue
            if start > at:
                break
            offset = at - start  # > 0: an overlap, a re-upload of bytes already read
            while offset < size:  # in ranges: a segment is never in memory whole
                try:
                    data = self.fs.cat_file(self.path(name), start=offset, end=min(size, offset + READ_BLOCK))
                except FileNotFoundError:  # deleted since the listing: what follows cannot be placed
                    data = b""
                if not data:
                    break
                yield data
                offset += len(data)
                at = start + offset

    def journal_end(self, rel: str) -> tuple[int, int]:
        """(newest generation, end offset) of a journal's segments; (0, 0) when it has none."""
        segs = self._segments(rel)
        if not segs:
            return 0, 0
        newest = segs[-1][0]
        end = 0
        for gen, start, _, size in segs:
            if gen == newest and start <= end:
                end = max(end, start + size)
        return newest, end


class JournalPusher:
    """Uploads what was appended to a local journal since the last push, as write-once segments of whole lines
    (at most `SEGMENT_BYTES` each, unless one line is longer), streamed from the file: a push holds about one
    `UPLOAD_BLOCK` in memory however much was appended. A journal rewritten in place (a new file renamed over
    it) starts a new generation."""

    def __init__(self, store: RunStore, local: Path, rel: str, state: dict[str, Any] | None = None):
        self.store, self.local, self.rel = store, local, rel
        s = state or {}
        self.generation, self.at, self.inode = int(s.get("gen", 0)), int(s.get("at", 0)), s.get("inode")

    def state(self) -> dict[str, Any]:
        return {"kind": "journal", "gen": self.generation, "at": self.at, "inode": self.inode}

    def push(self) -> int:
        try:
            fh = self.local.open("rb")
        except FileNotFoundError:
            return 0
        with fh:
            st = os.fstat(fh.fileno())  # the file opened, not a newer one renamed over it since
            rewritten = self.inode is not None and st.st_ino != self.inode
            if rewritten or st.st_size < self.at:
                self.generation, self.at = self.generation + 1, 0
                rewritten = True
            self.inode = st.st_ino
            sent = 0
            while True:
                cut = line_end(fh, self.at, min(st.st_size, self.at + SEGMENT_BYTES), st.st_size)
                if cut == self.at and not rewritten:
                    break
                fh.seek(self.at)
                self.store.upload_segment(self.rel, self.generation, self.at, fh, cut - self.at)
                sent += cut - self.at
                self.at = cut
                if rewritten:  # the new generation has its first segment: the old ones can go
                    for gen, _, name in self.store.segments(self.rel):
                        if gen < self.generation:
                            self.store.delete(name)
                    rewritten = False
        return sent


def _copy(src: IO[bytes], out: IO[bytes], size: int, rel: str) -> None:
    """The next `size` bytes of `src` into `out`, 1 MB at a time."""
    left = size
    while left > 0:
        chunk = src.read(min(1 << 20, left))
        if not chunk:
            raise RuntimeError(f"{rel}: the source ended {left:,} bytes short of {size:,}")
        out.write(chunk)
        left -= len(chunk)


def line_end(fh: IO[bytes], start: int, limit: int, size: int) -> int:
    """The offset just past the last newline of `fh` in [start, limit); past the first one in [limit, size)
    when there is none (a line longer than a segment); `start` when no line ends before `size`. Reads 1 MB
    at a time."""
    pos = limit
    while pos > start:
        n = min(1 << 20, pos - start)
        fh.seek(pos - n)
        i = fh.read(n).rfind(b"\n")
        if i >= 0:
            return pos - n + i + 1
        pos -= n
    fh.seek(limit)
    pos = limit
    while pos < size:
        chunk = fh.read(min(1 << 20, size - pos))
        if not chunk:
            break
        i = chunk.find(b"\n")
        if i >= 0:
            return pos + i + 1
        pos += len(chunk)
    return start


def iter_journal_rows(store: RunStore, rel: str) -> Iterator[dict[str, Any]]:
    """The complete rows of a journal (a torn last line, from a killed writer, is left out)."""
    import json

    rest = b""
    for chunk in store.journal_chunks(rel):
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for line in lines:
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    return
