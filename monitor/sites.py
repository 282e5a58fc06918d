"""Code-site attribution: which line of *user* code asked for a connection.

The site is the first frame, walking outwards, that is not SQLAlchemy, pool-monitor, the
standard library or an installed package. This runs on every checkout, so the walk reads
only `f_code`, `f_back` and (once found) `f_lineno`, and the library/user verdict is cached
per file; the site is kept as `(filename, line, function)` and formatted only when
exported.

Nothing is keyed by a code object: a code object hashes its name, constants and names
afresh on every call (microseconds for a large function such as `Connection.__init__`),
whereas a file name is a string, whose hash is computed once and cached. The verdict only
ever depended on the file name.

The user frame's line is not read on each checkout either: `frame.f_lineno` decodes the
code's line table from its start, which costs ~1.5 µs at the end of a 150-line request
handler. The site is looked up by `(id(code), f_lasti)` instead, two ints, and its line is
decoded once per call site. The cache keeps each code object it names (so its id cannot
be reused for another while the entry exists), and returns the same key tuple for the
same site every time.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Iterable
from types import CodeType, FrameType

import sqlalchemy

try:  # greenlet is how SQLAlchemy's asyncio layer runs sync code; optional for sync users
    from greenlet import getcurrent as _current_greenlet
except ImportError:  # pragma: no cover
    _current_greenlet = None

SiteKey = tuple[str, int, str]  # (co_filename, line, co_name)

_MONITOR_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_SQLALCHEMY_DIR = os.path.dirname(os.path.abspath(sqlalchemy.__file__)) + os.sep
_CACHE_LIMIT = 50_000


def _library_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    try:
        import site

        dirs.update(site.getsitepackages())
        dirs.add(site.getusersitepackages())
    except (AttributeError, ImportError):  # pragma: no cover - embedded interpreters
        pass
    return tuple(os.path.abspath(d) + os.sep for d in dirs if d)


class SiteFinder:
    """Finds and formats code sites; one per pool (the prefixes are per-pool settings)."""

    def __init__(self, exclude: Iterable[str] = (), include: Iterable[str] = ()) -> None:
        self._library = (
            _MONITOR_DIR,
            _SQLALCHEMY_DIR,
            *_library_dirs(),
            *(_absolute(p) for p in exclude),
        )
        self._include = tuple(_absolute(p) for p in include)
        self._verdicts: dict[str, bool] = {}  # by file name: True = library
        self._names: dict[SiteKey, str] = {}
        # (id(code), f_lasti) -> (site key, code): the code is kept, so its id is not reused
        self._sites: dict[tuple[int, int], tuple[SiteKey, CodeType]] = {}

    # -- hot path ---------------------------------------------------------------------
    def find(self, frame: FrameType | None) -> SiteKey | None:
        """The first user frame at or above `frame`, continuing across SQLAlchemy's greenlet
        bridge to the awaiting coroutine when the thread's own chain holds no user code."""
        verdict = self._verdicts.get
        glet = None
        while True:
            while frame is not None:
                code = frame.f_code
                filename = code.co_filename
                library = verdict(filename)
                if library is None:
                    library = self._classify(filename)
                if not library:
                    key = (id(code), frame.f_lasti)
                    known = self._sites.get(key)
                    if known is not None and known[1] is code:
                        return known[0]
                    return self._new_site(key, code, frame)
                frame = frame.f_back
            # Top of this greenlet's stack: under asyncio the caller's coroutine is
            # suspended in the parent greenlet, inside SQLAlchemy's greenlet_spawn.
            if _current_greenlet is None:
                return None
            glet = (_current_greenlet() if glet is None else glet).parent
            if glet is None:
                return None
            frame = glet.gr_frame

    def _new_site(self, key: tuple[int, int], code: CodeType, frame: FrameType) -> SiteKey:
        site = (code.co_filename, frame.f_lineno, code.co_name)
        if len(self._sites) >= _CACHE_LIMIT:  # generated code: stay bounded
            self._sites.clear()
        self._sites[key] = (site, code)
        return site

    # -- verdicts ---------------------------------------------------------------------
    def is_library(self, code: CodeType) -> bool:
        library = self._verdicts.get(code.co_filename)
        return self._classify(code.co_filename) if library is None else library

    def _classify(self, filename: str) -> bool:
        if filename.startswith("<"):
            library = True  # frozen modules, exec'd and generated code
        else:
            path = os.path.abspath(filename)
            if self._include and path.startswith(self._include):
                library = False
            else:
                library = path.startswith(self._library)
        if len(self._verdicts) >= _CACHE_LIMIT:  # generated files: stay bounded
            self._verdicts.clear()
        self._verdicts[filename] = library
        return library

    # -- formatting (export time) ---------------------------------------------------
    def name(self, site: SiteKey | None) -> str:
        """`path/relative.py:LINE:function`."""
        if site is None:
            return "unknown"
        text = self._names.get(site)
        if text is None:
            filename, line, function = site
            text = f"{relative_path(filename)}:{line}:{function}"
            if len(self._names) >= _CACHE_LIMIT:
                self._names.clear()
            self._names[site] = text
        return text

    def user_frames(self, frames: Iterable[FrameType]) -> list[FrameType]:
        """Keep only the frames of user code (for the holder's current stack)."""
        return [f for f in frames if not self.is_library(f.f_code)]


def _absolute(prefix: str) -> str:
    path = os.path.abspath(prefix)
    return path if prefix.endswith(".py") else path.rstrip(os.sep) + os.sep


def relative_path(filename: str) -> str:
    """The path relative to the deepest import root (sys.path entry or cwd) containing it,
    so sites read like module paths and do not change between machines."""
    try:
        path = os.path.abspath(filename)
        cwd = os.getcwd()
    except OSError:  # the working directory was deleted: still name the site
        return filename.replace(os.sep, "/")
    best = ""
    for root in (cwd, *sys.path):
        if not root:
            continue
        root = os.path.join(cwd, root) if not os.path.isabs(root) else root
        root = os.path.normpath(root).rstrip(os.sep) + os.sep
        if path.startswith(root) and len(root) > len(best):
            best = root
    return (path[len(best) :] if best else path).replace(os.sep, "/")


def format_stack(frames: Iterable[FrameType]) -> list[str]:
    """`path:LINE:function` lines, innermost last (the order of a traceback)."""
    return [
        f"{relative_path(f.f_code.co_filename)}:{f.f_lineno}:{f.f_code.co_name}" for f in frames
    ]


def walk_frames(frame: FrameType | None) -> list[FrameType]:
    """Frames from the outermost caller down to `frame` (traceback order)."""
    frames: list[FrameType] = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    frames.reverse()
    return frames
