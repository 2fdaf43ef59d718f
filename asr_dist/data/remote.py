"""Shard sets at URLs: https and http, object stores through fsspec (``s3://``), and ``pipe:`` commands.

  a set's location ──read_file──> index.json, vocab.json, samples.tsv (retried; a 404 stops, naming the URL)
  a shard (asr_dist.data.shardset.ShardInfo: its URL, size, checksum and ``fetch``)
      ──open_reader──> random access: a local file, the node-local cache's verified copy (``data.cache_dir``),
                       or ranged GETs (HTTP Range, S3 ranged GET): the length plan reads each sample at its offset
      ──open_stream──> one pass from the start that reconnects where it broke off: the streaming loader's read

Locations:
  /data/set, file:///data/set      a directory
  https://host/sets/set            a set's directory on a web server (index.json, vocab.json, samples.tsv and
                                   the shards side by side)
  s3://bucket/sets/set             an S3-compatible store through fsspec and s3fs; credentials and endpoint
                                   from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL)
  pipe:COMMAND                     as WebDataset spells it: COMMAND's standard output is the file, with {name}
                                   replaced by the file's name (pipe:aws s3 cp s3://bucket/set/{name} -)

A dropped connection, a timeout or a 5xx is retried with backoff (``RETRIES`` times, the log names the URL);
a 404, a refused credential or a checksum that differs from index.json stops with the URL and what to check.
Every network wait has a timeout, and all the tries of one read end before the hang watchdog's floor
(distributed.watchdog_floor_s, 600 s), so a dead server is an error naming its URL, not a hang.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import functools
import hashlib
import logging
import os
import re
import time
from pathlib import Path

from ..errors import PathNotFound, UserError

log = logging.getLogger(__name__)

RETRIES = 6  # tries after the first: 0.5, 1, 2, 4, 8, 16 s apart (about 30 s in all)
BACKOFF_SECONDS = 0.5
CONNECT_TIMEOUT_SECONDS = 30
READ_TIMEOUT_SECONDS = 45  # no byte for this long: the connection is dead
# so a dead server fails every try (7 x (30 + 45) s + 31.5 s of backoff) before the hang watchdog's 600 s floor;
# a pipe: command has no timeout of ours (the watchdog names a hung one)
CHUNK_BYTES = 8 << 20  # ranged reads of a stream, and the cache's download buffer
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class RemoteError(UserError):
    """A shard set at a URL that cannot be read: the message names the URL and what to check."""


def is_url(location: str | os.PathLike) -> bool:
    """Whether ``location`` is a URL or a ``pipe:`` command rather than a local path (file:// is local)."""
    s = str(location)
    return s.startswith("pipe:") or (bool(_URL.match(s)) and not s.startswith("file://"))


def local_path(location: str | os.PathLike) -> str:
    """A local location as a path (file:///data/set -> /data/set)."""
    s = str(location)
    return s[len("file://"):] if s.startswith("file://") else s


def join(location: str, name: str) -> str:
    """The file ``name`` of the set at ``location``."""
    if location.startswith("pipe:"):
        if "{name}" not in location:
            raise RemoteError(f"{location}: a pipe: location needs {{name}} where each file's name goes, "
                              f"e.g. pipe:curl -sfL https://host/set/{{name}}")
        return location.replace("{name}", name)
    if is_url(location):
        return location.rstrip("/") + "/" + name
    return os.path.join(local_path(location), name)


def _http_options() -> dict:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_SECONDS, sock_connect=CONNECT_TIMEOUT_SECONDS,
                                    sock_read=READ_TIMEOUT_SECONDS)
    return {"client_kwargs": {"timeout": timeout}}


@functools.lru_cache(maxsize=None)
def _filesystem(protocol: str, pid: int):
    """fsspec's filesystem for a protocol, one per process (an event loop and its sessions do not survive fork)."""
    try:
        import fsspec

        options = _http_options() if protocol in ("http", "https") else {}
        if protocol in ("s3", "s3a"):  # one try each in s3fs and botocore: the tries and their backoff are ours
            options = {"config_kwargs": {"retries": {"max_attempts": 1},
                                                        "connect_timeout": CONNECT_TIMEOUT_SECONDS,
                                                        "read_timeout": READ_TIMEOUT_SECONDS}}
        fs = fsspec.filesystem(protocol, skip_instance_cache=True, **options)
        if hasattr(fs, "retries"):
            fs.retries = 1  # s3fs's own tries (5 by default) would multiply ours
        return fs
    except ImportError as e:
        how = "'asr-dist[s3]'" if protocol in ("s3", "s3a") else e.name
        raise RemoteError(f"{protocol}:// locations need {e.name}: pip install {how}") from None
    except ValueError as e:  # fsspec: an unknown protocol
        raise RemoteError(f"{protocol}://: {e}; asr-dist reads https://, http://, s3:// and pipe: locations") from None


def _fs(url: str):
    return _filesystem(url.split("://", 1)[0].lower(), os.getpid())


def _status(e: BaseException) -> int | None:
    for attr in ("status", "code"):
        v = getattr(e, attr, None)
        if isinstance(v, int):
            return v
    resp = getattr(e, "response", None)  # botocore's ClientError
    if isinstance(resp, dict):
        return resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def _permanent(url: str, e: BaseException) -> UserError | None:
    """The error to stop with when ``e`` will not go away by trying again, or None (retry it)."""
    if isinstance(e, UserError):
        return e
    status = _status(e)
    if isinstance(e, FileNotFoundError) or status == 404:
        return PathNotFound(f"{url}: not found (404); check the URL and that the shard set was uploaded whole "
                            f"(index.json is written last)")
    if isinstance(e, PermissionError) or status in (401, 403) or type(e).__name__ in (
            "NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return RemoteError(f"{url}: access refused ({status or e}); check the credentials in the environment "
                           f"(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or the server's access rules)")
    if status is not None and 400 <= status < 500 and status not in (408, 425, 429):
        return RemoteError(f"{url}: the server refused the request ({status}: {e})")
    if isinstance(e, (ImportError, TypeError, AttributeError, AssertionError, MemoryError)):
        raise e  # a bug or a missing package, not the network
    return None


def retrying(url: str, what: str, fn):
    """``fn()``, tried again with backoff on a transient fault (a dropped connection, a timeout, a 5xx);
    a permanent one (404, refused credentials) or the last failure raises RemoteError naming ``url``."""
    for attempt in range(RETRIES + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - sorted into permanent and transient below
            stop = _permanent(url, e)
            if stop is not None:
                raise stop from None
            if attempt == RETRIES:
                raise RemoteError(f"{url}: {what} failed {RETRIES + 1} times, the last with {type(e).__name__}: "
                                  f"{str(e)[:200]}; check the network and the server") from None
            wait = BACKOFF_SECONDS * 2 ** attempt
            log.warning("%s: %s failed (%s: %s); trying again in %.1f s (%d of %d)", url, what, type(e).__name__,
                        str(e)[:200], wait, attempt + 1, RETRIES)
            time.sleep(wait)


def _pipe_read(cmd_url: str) -> bytes:
    from webdataset.gopen import gopen

    stream = gopen(cmd_url, "rb")
    try:
        data = stream.read()
    finally:
        stream.close()  # raises when the command exited with an error
    return data


def read_url(url: str, start: int | None = None, end: int | None = None) -> bytes:
    """The bytes of a file at a URL (``start``:``end`` of it, by a ranged read), retried."""
    if url.startswith("pipe:"):
        if start is not None:
            raise RemoteError(f"{url}: pipe: commands are read from the start; they give no byte ranges")
        return retrying(url, "reading", lambda: _pipe_read(url))

    def read():
        fs = _fs(url)
        data = fs.cat_file(url, start=start, end=end)
        if start is not None and end is not None and len(data) != end - start:
            raise RangeError(f"{url}: asked for bytes {start}-{end - 1}, got {len(data)} bytes")
        return data

    return retrying(url, "reading" if start is None else f"reading bytes {start}-{end}", read)


class RangeError(OSError):
    """A ranged read that came back another size (the server ignored the Range header, or was cut off)."""


def read_file(location: str | os.PathLike, name: str) -> bytes:
    """The file ``name`` of the shard set at ``location`` (a directory or a URL)."""
    location = str(location)
    if not is_url(location):
        return Path(join(location, name)).read_bytes()
    return read_url(join(location, name))


def serves_ranges(location: str, probe_name: str) -> bool:
    """Whether the store at ``location`` answers ranged reads, probed on the second byte of ``probe_name`` (a
    small file; uncompressed, as a server that gzips JSON ignores Range on it): S3 does; a web server where it
    honours Range headers. Retried like any read, so every rank of a job comes to the same answer or stops."""
    if location.startswith("pipe:"):
        return False
    url = join(location, probe_name)
    http = url.split("://", 1)[0].lower() in ("http", "https")
    extra = {"headers": {"Accept-Encoding": "identity"}} if http else {}
    return retrying(url, "probing for byte ranges", lambda: len(_fs(url).cat_file(url, start=1, end=2, **extra)) == 1)


@dataclasses.dataclass(frozen=True)
class Fetch:
    """How the shards of a set at a URL are read: through the node-local cache (``cache_dir``, at most
    ``cache_max_bytes``), else by ranged reads where the store serves them (``ranges``), else streamed."""

    cache_dir: str | None = None
    cache_max_bytes: int | None = None
    ranges: bool = False

    @property
    def random_access(self) -> bool:
        return self.cache_dir is not None or self.ranges


class LocalFile:
    """Random access to a local file."""

    def __init__(self, path: str):
        self.name = path
        self.fd = os.open(path, os.O_RDONLY)

    def pread(self, size: int, offset: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def pread_spans(self, spans: list[tuple[int, int]]) -> list[bytes]:
        """The bytes of each (size, offset)."""
        return [os.pread(self.fd, size, offset) for size, offset in spans]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class RangeFile:
    """Random access to a file at a URL by ranged reads."""

    def __init__(self, url: str):
        self.name = url

    def pread(self, size: int, offset: int) -> bytes:
        return read_url(self.name, offset, offset + size) if size else b""

    def pread_spans(self, spans: list[tuple[int, int]]) -> list[bytes]:
        """The bytes of each (size, offset), in one ranged read from the first to the end of the last (a
        sample's files lie side by side in its shard: one request per sample)."""
        start, end = min(o for _, o in spans), max(o + n for n, o in spans)
        data = self.pread(end - start, start)
        return [data[o - start:o - start + n] for n, o in spans]

    def close(self) -> None:
        pass


def open_reader(shard) -> LocalFile | RangeFile:
    """Random access to ``shard`` (a ShardInfo): its file, its verified copy in the cache, or ranged reads."""
    fetch = shard.fetch
    if fetch is None:
        return LocalFile(local_path(shard.path))
    if fetch.cache_dir is not None:
        return _open_cached(shard, LocalFile)
    if fetch.ranges:
        return RangeFile(shard.path)
    raise RemoteError(f"{shard.path}: the server gives no byte ranges; set data.cache_dir (a node-local directory) "
                      f"so that the shards are fetched whole, once per node")


def cached_copy(shard) -> str:
    """The local path of the verified copy of ``shard`` (at a URL) in its set's cache, fetched if needed."""
    fetch = shard.fetch
    return ShardCache(fetch.cache_dir, fetch.cache_max_bytes).get(shard.path, shard.bytes, shard.sha256, fetch.ranges)


def _open_cached(shard, opener):
    """``opener`` of the cached copy of ``shard``; fetched again where another process of the node removed the
    copy (to stay under data.cache_max_gb) between its lookup and the opening."""
    for _ in range(3):
        try:
            return opener(cached_copy(shard))
        except FileNotFoundError:
            continue
    raise RemoteError(f"{shard.path}: its cached copy was removed three times before it could be opened; "
                      f"data.cache_max_gb is too small for the shards the node's processes read at once")


def open_stream(shard):
    """A file object reading ``shard`` from its start: its file, its cached copy, or the URL, reconnecting
    where a dropped connection broke off."""
    fetch = shard.fetch
    if fetch is None:
        return open(local_path(shard.path), "rb")
    if fetch.cache_dir is not None:
        return _open_cached(shard, lambda path: open(path, "rb"))
    return Stream(shard.path, shard.bytes, fetch.ranges)


class Stream:
    """One pass over a file at a URL. A transient fault reopens it at the position reached (by a ranged read
    where the store serves them; else it reads again from the start and skips what was delivered); a file that
    ends before ``size`` bytes counts as a dropped connection."""

    def __init__(self, url: str, size: int = -1, ranges: bool = False):
        self.name, self.size, self.ranges = url, size, ranges
        self.pos = 0
        self._f = None

    def readable(self) -> bool:
        return True

    def _open_at(self, pos: int):
        if self.name.startswith("pipe:"):
            from webdataset.gopen import gopen

            f = gopen(self.name, "rb")
        else:
            fs = _fs(self.name)
            extra = {"size": self.size} if self.size >= 0 and self.name.split("://", 1)[0] in ("http", "https") else {}
            f = fs.open(self.name, "rb", block_size=CHUNK_BYTES if self.ranges else 0, **extra)
        try:
            if pos and self.ranges and not self.name.startswith("pipe:"):
                f.seek(pos)
                return f
            left = pos
            while left:  # no ranges: what was delivered already is read again and dropped
                got = f.read(min(left, CHUNK_BYTES))
                if not got:
                    raise ConnectionError(f"the file ended at byte {pos - left}, before byte {pos} that was read before")
                left -= len(got)
            return f
        except BaseException:
            _close_quietly(f)
            raise

    def _read_once(self, n: int) -> bytes:
        if self._f is None:
            self._f = self._open_at(self.pos)
        data = self._f.read(n)
        if not data and 0 <= self.size != self.pos:
            raise ConnectionError(f"the connection ended at byte {self.pos} of {self.size}")
        return data

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:  # the rest, read in bounded pieces (a stream's read() returns what is buffered)
            parts = []
            while True:
                part = self.read(CHUNK_BYTES)
                if not part:
                    return b"".join(parts)
                parts.append(part)
        if 0 <= self.size <= self.pos or n == 0:
            return b""

        def attempt():
            try:
                return self._read_once(n)
            except Exception:
                self._drop()
                raise

        data = retrying(self.name, f"reading from byte {self.pos}", attempt)
        self.pos += len(data)
        return data

    def _drop(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            _close_quietly(f)

    def close(self) -> None:
        if self._f is not None and 0 <= self.pos < self.size:
            self._drop()  # left before the end (a reader that took what it needed): nothing to check
            return
        f, self._f = self._f, None
        if f is not None:
            f.close()  # a pipe: command that failed says so here

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:
            self._drop()


def _close_quietly(f) -> None:
    """Close a connection or a pipe: command that is given up on (a command still running is killed first)."""
    proc = getattr(f, "proc", None)  # webdataset's Pipe
    if proc is not None and proc.poll() is None:
        proc.kill()
    try:
        f.close()
    except Exception:  # noqa: BLE001 - a broken connection's close may fail too; it is gone either way
        pass


class ShardCache:
    """A node-local directory of verified shard copies, named by their sha256: every process of the node
    that asks for a shard gets the same file, fetched once (an flock per shard), checked against
    index.json's size and checksum before it takes its name (a partial download never does), and the
    least recently used copies are removed when the cache would pass ``max_bytes``."""

    def __init__(self, directory: str | os.PathLike, max_bytes: int | None = None):
        self.dir = Path(os.path.expandvars(os.path.expanduser(str(directory))))
        self.max_bytes = max_bytes

    def get(self, url: str, size: int, sha256: str, ranges: bool = False) -> str:
        """The local path of the verified copy of the shard at ``url`` (fetched now if the cache lacks it)."""
        try:
            return self._get(url, size, sha256, ranges)
        except (UserError, FileNotFoundError):
            raise
        except OSError as e:  # the cache's own disk, not the shard: never taken for a damaged shard
            raise RemoteError(f"data.cache_dir {self.dir}: {e}; give a writable node-local directory with room "
                              f"for the shards") from None

    def _get(self, url: str, size: int, sha256: str, ranges: bool) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256 or ""):
            raise RemoteError(f"{url}: index.json gives no sha256 for this shard; rebuild the set with "
                              f"`asr-dist shards build` to cache it")
        final = self.dir / f"{sha256}.tar"
        if self._fresh(final, size):
            return str(final)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RemoteError(f"data.cache_dir {self.dir}: cannot create it ({e}); give a writable node-local "
                              f"directory") from None
        with open(self.dir / f".{sha256}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one process of the node fetches; the others wait for its copy
            if self._fresh(final, size):
                return str(final)
            for stale in self.dir.glob(f".{sha256}.*.partial"):  # left by a process that died mid-download
                stale.unlink(missing_ok=True)
            self._make_room(size, keep=final)
            partial = self.dir / f".{sha256}.{os.getpid()}.partial"
            t0 = time.perf_counter()
            try:
                digest = self._download(url, size, partial, ranges)
                if digest != sha256:
                    raise RemoteError(f"{url}: its sha256 differs from index.json's: the shard changed after the "
                                      f"set was written, or the store holds a damaged copy; check the upload and run "
                                      f"`asr-dist shards verify {url.rsplit('/', 1)[0]}`")
                os.replace(partial, final)
            finally:
                partial.unlink(missing_ok=True)
            log.info("cache: %s fetched to %s (%.1f MB in %.1f s)", url, final, size / 1e6, time.perf_counter() - t0)
        return str(final)

    def _fresh(self, path: Path, size: int) -> bool:
        try:
            if path.stat().st_size != size:
                return False
            os.utime(path)  # most recently used: evicted last
            return True
        except FileNotFoundError:
            return False

    def _download(self, url: str, size: int, partial: Path, ranges: bool) -> str:
        digest = hashlib.sha256()
        written = 0
        try:
            with Stream(url, size, ranges) as src, open(partial, "wb") as out:
                while True:
                    data = src.read(CHUNK_BYTES)
                    if not data:
                        break
                    digest.update(data)
                    out.write(data)
                    written += len(data)
                out.flush()
                os.fsync(out.fileno())
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise RemoteError(f"data.cache_dir {self.dir}: the disk is full fetching {url}; free space or set "
                                  f"data.cache_max_gb below what the disk holds") from None
            raise
        if written != size:
            raise RemoteError(f"{url}: {written} bytes, index.json says {size}; the shard changed after the set "
                              f"was written, or the upload is incomplete")
        return digest.hexdigest()

    def _make_room(self, size: int, keep: Path) -> None:
        """Remove the least recently used copies until ``size`` more bytes fit under ``max_bytes``."""
        if self.max_bytes is None:
            return
        if size > self.max_bytes:
            raise RemoteError(f"data.cache_max_gb={self.max_bytes / 1e9:g}: a shard of {size / 1e9:.2f} GB does not "
                              f"fit; raise it")
        with open(self.dir / ".evict.lock", "a") as lock:  # one process of the node evicts at a time
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._evict(size, keep)

    def _evict(self, size: int, keep: Path) -> None:
        copies = []
        for p in self.dir.glob("*.tar"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue  # removed by another process just now
            copies.append((st.st_mtime, p, st.st_size))
        used = sum(c[2] for c in copies)
        for _, p, n in sorted(copies, key=lambda c: (c[0], str(c[1]))):
            if used + size <= self.max_bytes:
                break
            if p == keep:
                continue
            p.unlink(missing_ok=True)  # a process reading it keeps its open file
            used -= n
            log.info("cache: removed %s (least recently used) to stay under %.2f GB", p.name, self.max_bytes / 1e9)


def remove(url: str) -> None:
    """Delete the file at ``url`` (an object store's key)."""
    retrying(url, "deleting", lambda: _fs(url).rm_file(url))


def upload_set(local_dir: str | os.PathLike, url: str, progress: bool = True) -> None:
    """Copy the finished shard set in ``local_dir`` to ``url`` (an object store or any writable fsspec URL),
    every file but index.json first and index.json last, so a reader never finds a partial set complete."""
    from tqdm import tqdm

    if url.startswith("pipe:") or url.split("://", 1)[0].lower() in ("http", "https"):
        raise RemoteError(f"{url}: shards build writes to a directory or an object store (s3://…); web servers "
                          f"and pipe: commands are read-only here")
    local = Path(local_dir)
    names = sorted(p.name for p in local.iterdir() if p.is_file() and not p.name.startswith("."))
    if "index.json" not in names:
        raise RemoteError(f"{local}: no index.json; the build did not finish, so nothing is uploaded")
    names.remove("index.json")
    names.append("index.json")
    fs = _fs(url)
    total = sum((local / n).stat().st_size for n in names)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"uploading to {url}", disable=not progress) as bar:
        for name in names:
            target = join(url, name)
            retrying(target, "uploading", lambda: fs.put_file(str(local / name), target))
            bar.update((local / name).stat().st_size)
