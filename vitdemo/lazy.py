"""Heavy packages imported where they are first needed, not at start-up (timm and torchvision take seconds)."""
import importlib
import threading
from types import ModuleType

_IMPORTING = threading.RLock()


def late_import(name: str) -> ModuleType:
    """`import name`, one thread at a time. timm's and torchvision's modules import one another: two threads
    importing them at once (two visitors' first requests) each find the other's module half made, and one
    fails with ImportError."""
    with _IMPORTING:
        return importlib.import_module(name)
