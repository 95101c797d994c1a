"""What every tab shares: the server (models, the training run, the policy), the model lists a visitor
gets, how errors reach people, and components that leave the checking of values to the package.

The page is built before torch is imported (two seconds on two cores): the tabs import the package's torch-free
modules only, and the first request imports the model code (`vitdemo.lazy.late_import`, in the model cache, the
views and the handlers of Compare and Inspect); `tests/test_backends.py` holds the page to that."""
import contextlib
import functools
import hashlib
import html
import inspect
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Generic, Iterator, TypeVar

import gradio as gr
import huggingface_hub
from PIL import Image

from ..catalog import (DEFAULT_SCRATCH, ModelCache, ModelUnavailable, imagenet_classes, model_shape, needs_download,
                       prefix_tokens)
from ..images import ImageError, load_image
from ..metadata import CheckpointError, read_metadata
from ..methods import METHODS, Progress, Stopped, kinds, offered
from ..policy import ServerPolicy, release_openmp_workers
from ..serving import PublishedFiles, publish_image
from ..training_job import TrainingBusy, TrainingFailed, TrainingJob

if TYPE_CHECKING:
    from ..backends import Model

USER_ERRORS = (ImageError, ModelUnavailable, CheckpointError, TrainingBusy, TrainingFailed, Stopped,
               FileNotFoundError, ValueError, TypeError)
MODEL_WORK = dict(concurrency_id='model', concurrency_limit=2)  # every event that runs a model: 2 cores
# an upload's preview: bounded apart, so that it neither waits behind other visitors' model work nor counts as
# one of a session's requests for the models (an Inspect running, then an upload in Predict, must not be refused)
DECODE_WORK = dict(concurrency_id='decode', concurrency_limit=2)
EXAMPLES = sorted((str(p) for p in (Path(__file__).resolve().parents[2] / 'examples').glob('*.*')
                   if p.suffix != '.md'), key=lambda p: 'cifar' not in p)  # CIFAR-10 photos first
log = logging.getLogger('vitdemo.server')
# galleries: as many rows as they need, no empty band below them, captions read whole; maps in two columns on
# a phone; example thumbnails four across and small everywhere, so that they do not push the results down a
# phone's page
CSS = """
.maps .grid-container, .examples .grid-container {
  grid-template-rows: none !important; grid-auto-rows: auto !important; }
.examples .grid-container { grid-template-columns: repeat(4, minmax(0, 1fr)) !important; }
.examples .thumbnail-item { aspect-ratio: 1; }
.examples .fixed-height { min-height: 0 !important; }
.maps .fixed-height { min-height: 0 !important; max-height: none !important; }
.maps .grid-wrap, .examples .grid-wrap { overflow-y: visible !important; }
.maps .caption-label { max-width: calc(100% - 8px) !important; white-space: normal !important; }
.run-progress { height: 12px; border-radius: 6px; background: var(--background-fill-secondary);
  border: 1px solid var(--border-color-primary); overflow: hidden; }
.run-progress > div { height: 100%; background: var(--color-accent); transition: width 0.5s; }
.colour-bar { margin: 0 4%; }
.colour-bar .strip { height: 18px; border: 1px solid var(--border-color-primary); }
.colour-bar .ends { display: flex; justify-content: space-between; gap: 1em; font-size: var(--text-sm); }
.colour-bar .ends span:first-child { white-space: nowrap; }
.colour-bar .ends span:last-child { text-align: right; }
@media (max-width: 640px) {
  .maps .grid-container { grid-template-columns: repeat(2, minmax(0, 1fr)) !important; }
}
"""


def session_of(request: gr.Request | None) -> str | None:
    """The browser session (a tab of one visitor's browser) a request comes from; None for a direct call."""
    return getattr(request, 'session_hash', None)


@dataclass
class Server:
    """One server's state, shared by every tab and session."""
    cache: ModelCache
    job: TrainingJob
    policy: ServerPolicy
    errors: OrderedDict = field(default_factory=OrderedDict)  # refusals not yet shown, per session
    stops: OrderedDict = field(default_factory=OrderedDict)  # per session: set to stop its explanation
    slow_slots: threading.Semaphore | None = None  # public mode: slow explanations at once (from the policy)
    downloads: PublishedFiles = field(default_factory=PublishedFiles)  # visitors' checkpoints handed out

    def __post_init__(self):
        if self.policy.slow_explanations:
            self.slow_slots = threading.Semaphore(self.policy.slow_explanations)

    def owner(self, request: gr.Request | None) -> str | None:
        """Whose models and run these are: the browser session in public mode; locally, one user owns all."""
        return session_of(request) if self.policy.public else None

    def model(self, name, request: gr.Request | None, progress: gr.Progress | None = None) -> 'Model':
        if not isinstance(name, str):
            raise ValueError(f'the model must be a name from the list, got {name!r}')
        if progress is not None and not self.cache.has(name, self.owner(request)):
            progress(0, desc=f'Loading {name}')
        return self.cache.get(name, self.owner(request))

    def shape(self, name, request: gr.Request | None) -> tuple[int, int]:
        """(layers, heads) of a listed model, or (1, 1) for a name that is not one."""
        try:
            return model_shape(name, self.cache.store, self.owner(request))
        except (ModelUnavailable, CheckpointError, TypeError):
            return 1, 1

    def methods(self, name, request: gr.Request | None) -> list[tuple[str, str]]:
        """The explanation methods a listed model offers, labelled, from its name and config alone."""
        try:
            prefix = prefix_tokens(name, self.cache.store, self.owner(request))
        except (ModelUnavailable, CheckpointError, TypeError):
            prefix = 1  # not a listed name: what its request will say
        return [(METHODS[m].label, m) for m in offered(kinds(prefix == 0, prefix))]

    @contextlib.contextmanager
    def explaining(self, request: gr.Request | None, progress: gr.Progress | None, what: str, *,
                   otherwise: str = 'pick a method not marked slow',
                   faster: str = 'pick a faster method or a smaller model',
                   fresh: bool = True) -> Iterator[Progress]:
        """A slow explanation's progress callback, for the length of the request: shown on the page, stopped
        by this session's Stop button and, in public mode, by the time limit. Only slow methods report
        progress, so the first report is where one starts: in public mode it must get one of the few slots
        for slow work (`ServerPolicy.slow_explanations`), which keeps model work free for everyone else.
        `otherwise` (besides waiting) and `faster` are what the visitor is told to do when the slots are taken
        or the time is up: what is open to them depends on the tab. A request forgets the session's earlier
        Stop, unless it starts no slow work (`fresh=False`, an option moved): then that Stop is still on its
        way to the slow work it was pressed for."""
        key = session_of(request)
        stop = self.stops.pop(key, None) or threading.Event()
        if fresh:
            stop.clear()
        self.stops[key] = stop
        while len(self.stops) > 1000:
            self.stops.popitem(last=False)
        limit = self.policy.max_explain_seconds
        deadline = time.monotonic() + limit if limit else None
        held = []

        def tell(share: float) -> None:
            if not held and self.slow_slots is not None:
                if not self.slow_slots.acquire(blocking=False):
                    raise Stopped(f'{what} is slow, and this server runs {self.policy.slow_explanations} slow '
                                  'explanation at a time, which another visitor is using: try again in a minute'
                                  + (f', or {otherwise}' if otherwise else ''))
                held.append(True)
            if stop.is_set():
                raise Stopped(f'{what} stopped at {share:.0%}, as asked')
            if deadline is not None and time.monotonic() > deadline:
                raise Stopped(f'{what} took longer than this server allows one explanation ({limit:g} s), and '
                              f'was stopped: {faster}')
            if progress is not None:
                progress(share, desc=what)
        try:
            yield tell
        finally:
            if held:
                self.slow_slots.release()

    def stop(self, request: gr.Request | None) -> None:
        """A Stop button's handler: this session's slow explanation ends at its next progress report."""
        stop = self.stops.get(session_of(request))
        if stop is not None:
            stop.set()

    def classes(self, name, request: gr.Request | None) -> list[str]:
        """A listed model's classes, without loading its weights: a checkpoint's metadata, or ImageNet's."""
        if isinstance(name, str) and name.split('/')[0] in ('timm', 'ours'):
            return imagenet_classes()
        try:
            path = self.cache.store.path(name, self.owner(request))
            return read_metadata(path)['classes'] if path is not None else []
        except (CheckpointError, TypeError):
            return []

    def _download_needed(self, request: gr.Request | None) -> list[tuple[str, bool]]:
        """Each listed name, and whether its pretrained weights would have to be downloaded first."""
        missing = set(needs_download(self.cache.weights_dir))
        return [(name, name.split('/')[0] in ('timm', 'ours') and name.split('/', 1)[1] in missing)
                for name in self.cache.names(self.owner(request))]

    def choices(self, request: gr.Request | None = None) -> list[tuple[str, str]]:
        """The model list as (label, name): models that need a download say so, and offline they say
        that they cannot be used here."""
        note = '  (needs a download: not available offline)' if huggingface_hub.constants.HF_HUB_OFFLINE else \
            '  (downloads on first use)'
        return [(name + note if download else name, name) for name, download in self._download_needed(request)]

    def usable(self, request: gr.Request | None = None) -> list[str]:
        """Names that answer here and now: checkpoints, and pretrained models whose weights are on disk
        (online, every model is)."""
        offline = huggingface_hub.constants.HF_HUB_OFFLINE
        return [name for name, download in self._download_needed(request) if not (offline and download)]

    def defaults(self, request: gr.Request | None = None) -> tuple[str, str]:
        """A model for every tab, and a second one for Compare: the shipped scratch model first, then
        a pretrained one that works here, then anything that does."""
        usable = self.usable(request) or [value for _, value in self.choices(request)]
        first = DEFAULT_SCRATCH if DEFAULT_SCRATCH in usable else usable[0]
        others = [n for n in usable if n != first]
        second = next((n for n in others if n.startswith('timm/')), others[0] if others else first)
        return first, second

    def remember_error(self, request: gr.Request | None, message: str) -> None:
        if request is not None:
            self.refused(request.session_hash, message)

    def refused(self, session_hash: str, message: str) -> None:
        """Keep a refusal's reason for the page's output area: one per refused request, since each has a
        handler that writes it there (`keeps_errors`)."""
        self.errors.setdefault(session_hash, deque(maxlen=8)).append((time.monotonic(), message))
        self.errors.move_to_end(session_hash)
        while len(self.errors) > 1000:
            self.errors.popitem(last=False)

    def error_note(self, request: gr.Request) -> str:
        """The refusal of this session that came first and is not yet shown, kept in the output area (a toast
        fades). A reason older than a few seconds belonged to a request whose event writes no note (a
        preview's): it is not given to a later, unrelated failure."""
        reasons = self.errors.get(request.session_hash) or deque()
        while reasons and time.monotonic() - reasons[0][0] > 10:
            reasons.popleft()
        message = reasons.popleft()[1] if reasons else 'the request failed'
        return f'<strong>Could not answer:</strong> {message}'


T = TypeVar('T')


class Reporter(Generic[T]):
    """Runs work in a thread of its own, so that a handler that has already answered once (a generator) can
    still show how far the work is: Gradio shows no progress bar after a handler's first yield. The work
    reports through `report` (a `Progress`), which passes each share on to `tell` (which may stop the work by
    raising `Stopped`) and to whoever iterates `run`. Closing `run` early (the visitor left, or the event was
    cancelled) stops the work at its next report."""

    def __init__(self, tell: Progress):
        self._tell = tell
        self._reports: queue.SimpleQueue[float] = queue.SimpleQueue()
        self._left = threading.Event()
        self._work: Future | None = None

    def report(self, share: float) -> None:
        if self._left.is_set():
            raise Stopped('nobody is waiting for it any more')
        self._tell(share)
        self._reports.put(share)

    def run(self, work: Callable[[], T], every: float = 0.25) -> Iterator[float]:
        """Starts `work` and yields each share it reports, as it comes, until it ends; then `result` gives
        what it returned, or raises what it raised."""
        pool = ThreadPoolExecutor(1, thread_name_prefix='reported-work')
        self._work = pool.submit(work)
        pool.shutdown(wait=False)
        try:
            while not self._work.done() or not self._reports.empty():
                try:
                    yield self._reports.get(timeout=every)
                except queue.Empty:
                    pass
        finally:
            if not self._work.done():
                self._left.set()

    def result(self) -> T:
        return self._work.result()


def shows_user_errors(server: Server):
    """Known input problems reach the browser as their own clear message (escaped: it is shown as HTML),
    are remembered for the page's output area, and give the server log one line; anything else stays
    Gradio's generic error, with the details only in the server log."""
    def decorate(fn):
        def refuse(e: Exception, args, kwargs):
            log.info('refused %s: %s', fn.__name__, e)
            request = next((a for a in (*args, *kwargs.values()) if isinstance(a, gr.Request)), None)
            server.remember_error(request, html.escape(str(e), quote=False))
            raise gr.Error(html.escape(str(e), quote=False), print_exception=False) from None

        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def stream(*args, **kwargs):
                try:
                    yield from fn(*args, **kwargs)
                except USER_ERRORS as e:
                    refuse(e, args, kwargs)
            return stream

        @functools.wraps(fn)
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except USER_ERRORS as e:
                refuse(e, args, kwargs)
        return call
    return decorate


def releases_workers(fn):
    """Model work whose thread lets its OpenMP workers go whenever it answers (`release_openmp_workers`): the
    server's threads idle for seconds after a request, and one that kept its workers would slow a training run,
    and every other visitor's request, meanwhile."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args, **kwargs):
            answers = fn(*args, **kwargs)
            try:
                for answer in answers:
                    release_openmp_workers()  # the next answer may be asked for from another thread
                    yield answer
            finally:
                answers.close()
                release_openmp_workers()
        return stream

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            release_openmp_workers()
    return call


class _Answers:
    """What one running request has answered so far, for identical requests that join it."""

    def __init__(self):
        self._changed = threading.Condition()
        self._count = 0
        self._last = None
        self._done = False
        self._error: BaseException | None = None

    def put(self, answer) -> None:
        with self._changed:
            self._count, self._last = self._count + 1, answer
            self._changed.notify_all()

    def close(self, error: BaseException | None = None) -> None:
        with self._changed:
            self._done, self._error = True, error
            self._changed.notify_all()

    def follow(self, patience: float) -> Iterator:
        """The latest answer, then each new one, until the request ends (then what it raised, if anything) or
        `patience` seconds have passed (then `gr.skip()` where none came: the outputs are left to its answer)."""
        deadline = time.monotonic() + patience
        seen = 0
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._count > seen or self._done, max(0.0, deadline - time.monotonic()))
                fresh, seen = self._count > seen, self._count
                answer, done, error = self._last, self._done, self._error
            if fresh:
                yield answer
            if done:
                if isinstance(error, Exception):
                    raise error
                if error is not None:  # the first request was closed (its visitor left): no answer to give
                    raise Stopped('the same request, asked first, ended without an answer: ask again')
                return
            if time.monotonic() >= deadline:
                if not seen:
                    yield gr.skip()
                return


def joins_running(fn=None, *, patience: float = 5.0):
    """A handler that one session calls again with the same inputs while the first call still runs waits for
    that call's answers instead of working twice. Picking a model or an image starts the work at once, and a
    newcomer then presses the tab's button too: on two cores the second run would halve the speed of both, and
    in public mode a second slow test would be refused as if another visitor held the slot. It waits `patience`
    seconds at most, then leaves the outputs to the first call's answer (`gr.skip()`): a waiting call holds one
    of the server's two slots for model work, and one visitor must not hold both through a minute-long test.
    Calls from other sessions, with other inputs, or after the first has ended run as ever (nothing is cached)."""
    if fn is None:
        return functools.partial(joins_running, patience=patience)
    signature = inspect.signature(fn)
    running: dict[tuple, _Answers] = {}
    lock = threading.Lock()

    def key_of(args, kwargs) -> tuple:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        request = next((v for v in bound.arguments.values() if isinstance(v, gr.Request)), None)
        inputs = tuple((name, hashlib.sha1(value).digest() if isinstance(value, (bytes, bytearray)) else repr(value))
                       for name, value in bound.arguments.items()
                       if not isinstance(value, (gr.Request, gr.Progress)))
        return session_of(request), inputs

    def answers(args, kwargs, work: Callable[[], Iterator]) -> Iterator:
        key = key_of(args, kwargs)
        with lock:
            first = key not in running
            shared = running.setdefault(key, _Answers())
        if not first:
            yield from shared.follow(patience)
            return
        error = None
        try:
            for answer in work():
                shared.put(answer)
                yield answer
        except BaseException as e:
            error = e
            raise
        finally:
            with lock:  # a request from now on runs anew
                running.pop(key, None)
            shared.close(error)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args, **kwargs):
            yield from answers(args, kwargs, lambda: fn(*args, **kwargs))
        return stream

    @functools.wraps(fn)
    def call(*args, **kwargs):
        *_, answer = answers(args, kwargs, lambda: iter((fn(*args, **kwargs),)))
        return answer
    return call


def keeps_errors(event, server: Server, output: gr.Markdown | gr.HTML) -> None:
    """When `event` is refused, its message stays in `output` (the toast fades)."""
    event.failure(server.error_note, None, output, api_visibility='private')


class Slider(gr.Slider):
    """A slider that hands the handler whatever a raw API call sent (None, text, NaN), for the package's
    checks to refuse with a clear message; Gradio's own check fails on those with a TypeError and a
    traceback. `is_template`: the browser draws it as the slider it is."""
    is_template = True

    def preprocess(self, payload):
        return payload


def bounded(value, minimum: int, maximum: int, **props) -> gr.Slider:
    """An update of a slider's bounds that names a value only where the current one falls outside them: the
    answer to a model change can land after the visitor has moved the slider, and must not set it back."""
    value = int(value or minimum)
    clamped = {} if minimum <= value <= maximum else {'value': min(max(value, minimum), maximum)}
    return gr.Slider(minimum=minimum, maximum=maximum, **clamped, **props)


class Number(gr.Number):
    """A number field that hands raw values to the handler, as `Slider` does."""
    is_template = True

    def preprocess(self, payload):
        return payload


def image_box(label: str = 'Image') -> gr.File:
    """The upload box, with a preview of the image under it once there is one."""
    # bytes, decoded by `vitdemo.images` alone (gr.Image would decode uploads with every PIL plugin before
    # any of our checks), and not a path: Gradio's file-path mode leaves an empty temporary file behind
    box = gr.File(label=label, file_types=['image'], type='binary')
    preview = gr.Image(label='Your image', interactive=False, height=200, visible=False, buttons=[])

    def show(data: bytes | None):
        try:
            picture = load_image(data) if data is not None else None
        except ImageError:  # the request that uses it says why
            picture = None
        if picture is None:
            return gr.Image(value=None, visible=False)
        picture.thumbnail((400, 400))
        if max(picture.size) < 160:  # a CIFAR-10 photo: 32 pixels, shown as the blocks the model sees
            factor = 160 // max(picture.size)
            picture = picture.resize((picture.width * factor, picture.height * factor), Image.Resampling.NEAREST)
        return gr.Image(value=publish_image(picture), visible=True)
    box.change(show, box, preview, api_visibility='private', show_progress='hidden', **DECODE_WORK)
    return box


def example_picker(image: gr.File, label: str) -> gr.Gallery:
    """Example thumbnails; a click puts the example in `image`, whose change event (if any) does the rest."""
    examples = gr.Gallery(EXAMPLES, label=label, columns=3, height='auto', allow_preview=False, object_fit='cover',
                          buttons=[], interactive=False, elem_classes=['examples'])

    def pick(evt: gr.SelectData) -> str:
        return EXAMPLES[evt.index]
    examples.select(pick, None, image, api_visibility='private')
    return examples


def model_list(server: Server, label: str, value: str) -> gr.Dropdown:
    # names outside the first choices are accepted (a visitor's newly trained model); the store checks them
    return gr.Dropdown(server.choices(), value=value, label=label, allow_custom_value=True)


def published(gallery: list) -> list[tuple[str, str]]:
    return [(publish_image(picture), caption) for picture, caption in gallery]

