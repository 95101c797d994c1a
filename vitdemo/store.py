"""Where checkpoints live, by name, and whose they are.

Two namespaces that never share a folder:
- `scratch/NAME` is `weights/NAME.safetensors`: the shipped checkpoints and what `python -m vitdemo.train`
  writes there. The app reads this folder (pretrained timm weights kept for offline use lie there too) and
  never writes it.
- `trained/NAME` is `weights/trained/NAME.safetensors` (or `$VITDEMO_RUNS`): what the Train tab writes.
  In public mode each browser session has a folder of its own there, named by a hash of the session, so
  one visitor neither sees nor replaces another's models.

A new run never replaces a file: a name in use gets the next free `NAME-2`, `NAME-3`, ... (compared without
case, as on macOS and Windows disks). Where caps are set, the oldest visitors' checkpoints are evicted to
make room for a training run, and only the visitor's own for a checkpoint brought back; the shipped ones, in
the other folder, never are.
"""
import hashlib
import os
import re
import shutil
import time
from pathlib import Path

from .policy import ServerPolicy
from .metadata import CheckpointError, read_metadata

SUFFIX = '.safetensors'
NAME_PATTERN = re.compile(r'[A-Za-z0-9][A-Za-z0-9_-]{0,47}')
PARTIAL_MAX_AGE = 600  # seconds: a save takes seconds, so an older temporary file is an orphan of a kill


class StoreFull(ValueError):
    """No room for another checkpoint within the store's caps."""


class ModelStore:
    """Checkpoints by list name, for one owner at a time (None: the local user, who owns everything).

    Args:
        weights_dir: the shipped and command-line checkpoints (`scratch/`), read only.
        runs_dir: the Train tab's checkpoints (`trained/`); default `weights_dir/trained`.
        public: give each owner a folder of their own under `runs_dir`.
        max_files, max_bytes: caps on `runs_dir` as a whole, all owners together (None: no cap).
    """

    def __init__(self, weights_dir: str | Path, runs_dir: str | Path | None = None, public: bool = False,
                 max_files: int | None = None, max_bytes: int | None = None):
        self.weights_dir = Path(weights_dir)
        self.runs_dir = Path(runs_dir or os.environ.get('VITDEMO_RUNS') or self.weights_dir / 'trained')
        self.public = public
        self.max_files = max_files
        self.max_bytes = max_bytes

    @classmethod
    def from_policy(cls, weights_dir: str | Path, policy: ServerPolicy, runs_dir: str | Path | None = None):
        """The store a server with `policy` keeps: per-session folders in public mode, the policy's caps."""
        return cls(weights_dir, runs_dir, public=policy.public, max_files=policy.store_max_files,
                   max_bytes=int(policy.store_max_mb * 2 ** 20) if policy.store_max_mb else None)

    def folder(self, owner: str | None) -> Path | None:
        """The owner's folder of trained models; None for a public visitor without a session."""
        if not self.public:
            return self.runs_dir
        if not owner:
            return None
        return self.runs_dir / hashlib.sha256(owner.encode()).hexdigest()[:16]

    def checkpoint_names(self, owner: str | None = None) -> list[str]:
        """`scratch/` then `trained/` names this owner may use, each a readable vitdemo checkpoint."""
        names = [f'scratch/{p.stem}' for p in _checkpoints(self.weights_dir)]
        folder = self.folder(owner)
        return names + [f'trained/{p.stem}' for p in (_checkpoints(folder) if folder else [])]

    def path(self, name: str, owner: str | None = None) -> Path | None:
        """The file behind a listed checkpoint name, or None when this owner has no such checkpoint."""
        if name not in self.checkpoint_names(owner):
            return None
        kind, _, stem = name.partition('/')
        return (self.weights_dir if kind == 'scratch' else self.folder(owner)) / f'{stem}{SUFFIX}'

    def usage(self) -> tuple[int, int]:
        """(files, bytes) of trained checkpoints, all owners together."""
        files = self._trained_files()
        return len(files), sum(f.stat().st_size for f in files)

    def reserve(self, name: str, owner: str | None, nbytes: int, others_make_room: bool = True) -> Path:
        """The path a new checkpoint of `nbytes` will take: `name` or the next free variant of it, after making
        room under the caps, oldest trained checkpoints first: anyone's for a training run (minutes of work a
        flood cannot repeat quickly), or with `others_make_room=False` only the owner's own, so that a cheap
        addition (a checkpoint brought back) never removes another visitor's model. Refuses what cannot fit."""
        folder = self.folder(owner)
        if folder is None:
            raise ValueError('a model of your own needs a browser session; reload the page')
        if self.max_bytes is not None and nbytes > self.max_bytes:
            raise StoreFull(f'this model\'s checkpoint ({nbytes / 2 ** 20:,.1f} MB) is larger than this server '
                            f'keeps ({self.max_bytes / 2 ** 20:,.1f} MB in all); make the model smaller')
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self._make_room(nbytes, None if others_make_room else folder)
        free = shutil.disk_usage(self.runs_dir).free
        if free < nbytes + 100 * 2 ** 20:
            raise StoreFull(f'the disk has {free / 2 ** 20:,.0f} MB free, too little for this model\'s '
                            f'{nbytes / 2 ** 20:,.0f} MB checkpoint')
        folder.mkdir(parents=True, exist_ok=True)
        taken = {p.stem.casefold() for p in folder.glob(f'*{SUFFIX}')}
        candidate, n = name, 1
        while candidate.casefold() in taken:
            n += 1
            candidate = f'{name}-{n}'
        return folder / f'{candidate}{SUFFIX}'

    def _make_room(self, nbytes: int, only_in: Path | None = None) -> None:
        files = self._trained_files()
        count, total = len(files), sum(f.stat().st_size for f in files)

        def over() -> bool:
            return (self.max_files is not None and count + 1 > self.max_files) or \
                (self.max_bytes is not None and total + nbytes > self.max_bytes)
        evictable = sorted((f for f in files if only_in is None or f.parent == only_in),
                           key=lambda f: f.stat().st_mtime)
        while evictable and over():
            oldest = evictable.pop(0)
            count, total = count - 1, total - oldest.stat().st_size
            oldest.unlink(missing_ok=True)
        if over():
            raise StoreFull('this server holds as many visitors\' models as it keeps; try again in a while, or run '
                            'vitdemo on your own machine')

    def _trained_files(self) -> list[Path]:
        return [p for p in self.runs_dir.rglob(f'*{SUFFIX}') if p.is_file()] if self.runs_dir.is_dir() else []

    def clean_partials(self, max_age: float = PARTIAL_MAX_AGE) -> list[Path]:
        """Remove temporary files a killed save left behind (`.NAME.safetensors.*.tmp`, see
        `weights.save_checkpoint`), in both folders; younger ones may belong to a save in progress."""
        removed = []
        for folder in (self.weights_dir, self.runs_dir):
            if not folder.is_dir():
                continue
            for path in folder.rglob('.*.tmp'):
                try:
                    if time.time() - path.stat().st_mtime > max_age:
                        path.unlink()
                        removed.append(path)
                except OSError:  # removed meanwhile, or not ours to remove
                    continue
        return removed


def _checkpoints(folder: Path) -> list[Path]:
    found = []
    for path in sorted(folder.glob(f'*{SUFFIX}')) if folder.is_dir() else []:
        try:
            read_metadata(path)
        except CheckpointError:
            continue  # pretrained timm weights kept for offline use, or a stray file
        found.append(path)
    return found
