"""Start-up kept short: heavy packages imported where they are first needed (torch, timm and torchvision take
seconds), gradio imported without what only editors and notebooks use, and its web app built once, at launch.

The app's page is built from torch-free modules (`vitdemo.catalog`, `vitdemo.metadata`, `vitdemo.methods`,
`vitdemo.train_form`, `vitdemo.policy`, `vitdemo.views`, ...); the code that runs models, and torch with it, is
imported by `late_import` where a request first needs it, or ahead of it by the server (`import_ahead`)."""
import contextlib
import functools
import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
import time
from types import ModuleType
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_IMPORTING = threading.RLock()
_IMPORTED: set[str] = set()  # names `late_import` has imported whole


def late_import(name: str) -> ModuleType:
    """`import name`, one thread at a time. timm's and torchvision's modules import one another: two threads
    importing them at once (two visitors' first requests) each find the other's module half made, and one
    fails with ImportError. A name imported before is returned at once, without waiting for an import that
    another thread (the server's warm-up) is running meanwhile."""
    if name in _IMPORTED:
        return sys.modules[name]
    with _IMPORTING:
        module = importlib.import_module(name)
        _IMPORTED.add(name)
        return module


def import_ahead(*names: str) -> float:
    """Imports `names` now, as `late_import` does: for a server to import in the background, once its page
    answers, what its first requests would otherwise wait seconds for (a request that needs one meanwhile
    waits for this import, not a second one). Returns the seconds it took."""
    start = time.perf_counter()
    for name in names:
        late_import(name)
    return time.perf_counter() - start


def new_figure(**kwargs) -> 'Figure':
    """A matplotlib Figure (no pyplot: thread-safe); its module, half a second to import, on first use."""
    return late_import('matplotlib.figure').Figure(**kwargs)


def _no_stubs(*args, **kwargs) -> None:
    return None


class _LeanGradio(importlib.abc.MetaPathFinder):
    """Finds `gradio.component_meta` as Python would and runs it, then swaps its `.pyi` writer for a no-op;
    with `hide_ipython`, IPython cannot be imported at all (as where it is not installed)."""

    def __init__(self, hide_ipython: bool):
        self.hide_ipython = hide_ipython

    def find_spec(self, name, path=None, target=None):
        if self.hide_ipython and name.split('.')[0] == 'IPython':
            raise ModuleNotFoundError(f'{name}: this server runs outside IPython and does not import it', name=name)
        if name != 'gradio.component_meta':
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def run_without_stubs(module: ModuleType) -> None:
            run(module)
            if hasattr(module, 'create_or_modify_pyi'):
                module.create_or_modify_pyi = _no_stubs

        spec.loader.exec_module = run_without_stubs  # this file's own loader: nothing else is loaded by it
        return spec


def lean_gradio_import() -> None:
    """Before gradio's first import, for a server process: two things gradio does that a server never uses,
    nearly half of `import gradio` on a 2-core CPU (docs/benchmarks.md, *Start-up*). Every Gradio component
    class, as it is defined, rewrites its type stub (`.pyi`, for editors and type checkers) by parsing its own
    source file. And where IPython is installed, gradio imports it (half a second) for its notebook magics and, as
    each page is built, to ask whether it runs in Colab: IPython is hidden from this process unless it is
    already running in it (a notebook keeps it whole). Does nothing once gradio is imported, and nothing but
    cost if a Gradio release renames the stub writer."""
    if 'gradio.component_meta' not in sys.modules and not any(isinstance(f, _LeanGradio) for f in sys.meta_path):
        sys.meta_path.insert(0, _LeanGradio(hide_ipython='IPython' not in sys.modules))


_BUILDING = threading.local()


def _skipped_while_building(create_app):
    @functools.wraps(create_app)
    def create(*args, **kwargs):
        return None if getattr(_BUILDING, 'layout', False) else create_app(*args, **kwargs)
    return staticmethod(create)


@contextlib.contextmanager
def app_built_at_launch() -> Iterator[None]:
    """Within it, this thread's Blocks get no web app until `launch`. Gradio builds its FastAPI app (each
    route's signature analysed by pydantic: 0.1-0.3 s on two cores) when a Blocks is made, when its `with`
    closes and at each `queue()`, and `launch` builds the one that serves; the others are thrown away. The
    Blocks' `app` is None until then. Other threads build theirs as usual."""
    from gradio.routes import App
    with _IMPORTING:
        if not hasattr(App.create_app, '__wrapped__'):
            App.create_app = _skipped_while_building(App.create_app)
    outer, _BUILDING.layout = getattr(_BUILDING, 'layout', False), True
    try:
        yield
    finally:
        _BUILDING.layout = outer
