"""What a public Gradio server needs beyond Gradio's own limits: no output file rewritten while it is
served, a few queued requests per browser session, and a bound on the upload folder.

Each piece is small and tested through a real server (`tests/test_public.py`). Two of them reach into
Gradio 6's queue and upload route by name; those tests fail if a Gradio release moves them.
"""
import contextlib
import hashlib
import io
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

from fastapi import HTTPException
from gradio.route_utils import get_fn
from PIL import Image
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger('vitdemo.server')


def cache_folder() -> Path:
    """Gradio's folder for uploads and outputs ($GRADIO_TEMP_DIR, else the system's temp folder)."""
    from gradio.utils import get_upload_folder
    return Path(get_upload_folder())


def publish_image(image: Image.Image, fmt: str = 'jpeg', quality: int = 90) -> str:
    """Encode an output image into Gradio's cache, as Gradio would (a folder named by the content's hash),
    but write it under a temporary name and rename it into place, and never rewrite a file already there.
    Gradio's own `save_pil_to_cache` rewrites the file in place on every request that draws the same
    picture, so a client still downloading the earlier copy gets a short read ("Too little data for
    declared Content-Length"). The path returned lies in the cache, so Gradio serves it as it is and its
    `delete_cache` sweep removes it."""
    buffer = io.BytesIO()
    image.save(buffer, fmt.upper(), **({'quality': quality} if fmt.lower() in ('jpeg', 'jpg', 'webp') else {}))
    data = buffer.getvalue()
    path = cache_folder() / hashlib.sha256(data).hexdigest() / f'image.{fmt.lower()}'
    if path.exists():  # drawn before (every request of a gallery draws its input again): nothing to write
        _renew(path)
        return str(path)
    return str(_publish(lambda f: f.write(data), path.name))


def _publish(write: Callable, name: str) -> Path:
    """`cache/<sha256 of the content>/name`: the content `write(file)` writes, written under a temporary name
    and renamed into place, unless that file is already there."""
    folder = cache_folder()
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.publish.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            hashing = _Hashing(f)
            write(hashing)
        path = folder / hashing.sha.hexdigest() / name
        if path.exists():
            _renew(path)
            return path
        path.parent.mkdir(exist_ok=True)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        return path
    finally:
        Path(tmp).unlink(missing_ok=True)


def _renew(path: Path) -> None:
    """The sweep ages files by ctime: a copy handed out again starts a new life (setting the times to what they
    are renews ctime alone; the file's bytes and mtime stay as a download sees them)."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


class _Hashing:
    """A file opened for writing that also hashes what is written to it."""

    def __init__(self, file):
        self.file, self.sha = file, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        return self.file.write(data)


class PublishedFiles:
    """Files handed out for download (a visitor's checkpoint), each copied into Gradio's cache under the hash of
    its content (a link only someone who has the file could work out; served as it is, removed by the sweep).
    At most `keep` copies at once, the oldest removed first: a run a minute from a hostile client would
    otherwise fill the disk with copies before the sweep comes, and the upload folder's quota with it."""

    def __init__(self, keep: int = 8):
        self.keep = keep
        self._copies: OrderedDict[tuple, Path] = OrderedDict()  # by the source file's identity, oldest first
        self._lock = threading.Lock()

    def publish(self, source: str | Path) -> str:
        """The path of a copy of `source`, under its own name, that Gradio serves."""
        st = os.stat(source)
        # a checkpoint is never rewritten in place: the same file, unchanged, has its copy already
        key = (str(Path(source).resolve()), st.st_ino, st.st_mtime_ns, st.st_size)

        def copy(f):
            with open(source, 'rb') as src:
                while chunk := src.read(2 ** 20):
                    f.write(chunk)
        with self._lock:  # one copy at a time: a lost race must not count a copy twice or evict a fresh one
            path = self._copies.get(key)
            if path is not None and path.exists():
                _renew(path)
            else:
                path = _publish(copy, Path(source).name)
            self._copies[key] = path
            self._copies.move_to_end(key)
            while len(self._copies) > self.keep:
                _, oldest = self._copies.popitem(last=False)
                if oldest in self._copies.values():  # the same content under another source's key
                    continue
                oldest.unlink(missing_ok=True)  # a download under way reads on: the file lives while it is open
                with contextlib.suppress(OSError):  # another file of the same content may share the folder
                    oldest.parent.rmdir()
        return str(path)


def limit_queue_per_session(demo, limit: int, groups: dict[str, int] | None = None,
                            refused: Callable[[str, str], None] | None = None) -> None:
    """Let one browser session hold at most `limit` requests, waiting or running, and at most `groups[id]` of
    the events that share the concurrency id `id` (e.g. the two slots of model work: one session filling both
    and queueing more behind them makes every other visitor wait for all of it). Past a limit, that session
    alone is refused, and everyone else's requests still get their turn in the queue.
    The refusal is HTTP 429 with its reason: Gradio's page shows a refusal's reason, except a 503's, for which
    it says the whole application is busy (what Gradio answers when the queue itself is full). `refused` is
    told each refusal's session and reason (the page's output areas show it: the refused event's failure
    handlers run, but the request never reaches a handler that could say why).
    Wraps the queue's `push`, where Gradio itself refuses requests when the whole queue is full."""
    queue = demo._queue
    push = queue.push
    groups = groups or {}

    def held_by(session_hash: str, concurrency_id: str | None = None) -> int:
        def counts(e) -> bool:
            return e.session_hash == session_hash and concurrency_id in (None, e.concurrency_id)
        waiting = sum(counts(e) for q in queue.event_queue_per_concurrency_id.values() for e in q.queue)
        running = sum(counts(e) for job in queue.active_jobs if job for e in job)
        return waiting + running

    def refuse(session_hash: str, reason: str):
        if refused is not None:
            refused(session_hash, reason)
        return HTTPException(429, reason)

    async def push_within_limit(body, request, username):
        if body.session_hash and held_by(body.session_hash) >= limit:
            log.info('refused a request: session already holds %d requests', limit)
            raise refuse(body.session_hash, f'You already have {n_requests(limit)} waiting or running, in this tab '
                                            'or another: wait for them to finish, then try again.')
        try:
            group = get_fn(demo, None, body).concurrency_id
        except Exception:  # no such function: Gradio's own push answers that
            group = None
        if body.session_hash and group in groups and held_by(body.session_hash, group) >= groups[group]:
            log.info('refused a request: session already holds %d requests of %r', groups[group], group)
            raise refuse(body.session_hash, f'You already have {n_requests(groups[group])} for the models waiting '
                                            'or running, in this tab or another: wait for one to finish, then try '
                                            'again.')
        return await push(body, request, username)

    queue.push = push_within_limit


def n_requests(n: int) -> str:
    return f'{n} request' + ('' if n == 1 else 's')


class UploadQuota:
    """ASGI middleware: refuse uploads (HTTP 507) while Gradio's upload folder holds more than `max_bytes`.
    Gradio takes uploads that no request ever uses and keeps them until its `delete_cache` sweep; this
    bounds the disk they can take meanwhile. The folder's size is recounted at most every `recount` seconds."""

    def __init__(self, app: ASGIApp, max_bytes: int, folder: Path | None = None, recount: float = 1.0):
        self.app = app
        self.max_bytes = max_bytes
        self.folder = folder
        self.recount = recount
        self._size, self._counted = 0, float('-inf')
        self._lock = threading.Lock()

    def used(self) -> int:
        with self._lock:
            if time.monotonic() - self._counted > self.recount:
                folder = self.folder or cache_folder()
                self._size = sum(p.stat().st_size for p in folder.rglob('*') if p.is_file()) if folder.is_dir() else 0
                self._counted = time.monotonic()
            return self._size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope['type'] == 'http' and scope['method'] == 'POST' and scope['path'].endswith('/upload')
                and self.used() > self.max_bytes):
            log.info('refused an upload: the upload folder is over its %d MB', self.max_bytes // 2 ** 20)
            response = PlainTextResponse('the server holds too many uploaded files right now; '
                                         'try again in a few minutes', status_code=507)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
