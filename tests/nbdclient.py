"""libnbd's Python binding (`import nbd`) for the tests, from this interpreter.

Debian's python3-libnbd installs nbd.py and libnbdmod.cpython-311-*.so into
/usr/lib/python3/dist-packages, which only /usr/bin/python3 searches.  The extension is
built for CPython 3.11's stable-per-minor ABI, so any 3.11 can load it: `load()` puts a
temporary directory holding symlinks to just those two files on sys.path (not the
whole dist-packages, whose other packages would shadow ours) and imports it.

When the extension will not load here (another minor version), `load()` falls back to
a proxy: the same API, every call forwarded to a small server script run under
/usr/bin/python3 (pickles over a pipe).  Only the synchronous calls the tests use are
supported there (no nbd.Buffer, no aio).  MIRRORD_NBD_SUBPROCESS=1 forces the fallback.
"""

from __future__ import annotations

import atexit
import errno as errno_module
import glob
import importlib
import os
import pickle
import select
import shutil
import subprocess
import sys
import tempfile
import types

DIST = "/usr/lib/python3/dist-packages"
SYSTEM_PYTHON = "/usr/bin/python3"
CALL_TIMEOUT = 30.0

_loaded: types.ModuleType | None = None
_reason: str | None = None


def load() -> types.ModuleType:
    """The `nbd` module (real or proxied); raises ImportError with the reason if absent."""
    global _loaded, _reason
    if _loaded is not None:
        return _loaded
    if _reason is not None:
        raise ImportError(_reason)
    try:
        _loaded = _load()
    except ImportError as exc:
        _reason = str(exc)
        raise
    return _loaded


def _load() -> types.ModuleType:
    py = os.path.join(DIST, "nbd.py")
    libs = glob.glob(os.path.join(DIST, "libnbdmod*.so"))
    if not os.path.exists(py) or not libs:
        raise ImportError(f"libnbd's Python binding is not installed ({py} / libnbdmod*.so "
                          "missing): apt-get install python3-libnbd")
    if os.environ.get("MIRRORD_NBD_SUBPROCESS") != "1":
        tmp = tempfile.mkdtemp(prefix="nbdbinding-")
        atexit.register(shutil.rmtree, tmp, True)
        for path in [py] + libs:
            os.symlink(path, os.path.join(tmp, os.path.basename(path)))
        sys.path.insert(0, tmp)
        try:
            module = importlib.import_module("nbd")
            module.NBD()  # the extension really loads and makes a handle
            return module
        except ImportError as exc:
            first_error = exc
        finally:
            sys.path.remove(tmp)
        sys.modules.pop("nbd", None)
        sys.modules.pop("libnbdmod", None)
    else:
        first_error = None
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        raise ImportError(f"cannot load libnbd's binding here ({first_error}) and "
                          f"{SYSTEM_PYTHON} is missing")
    return _ProxyModule()


# --- the subprocess fallback ---------------------------------------------------------

_SERVER = r"""
import os, pickle, sys
import nbd
inp = os.fdopen(0, "rb"); out = os.fdopen(1, "wb")
def send(obj):
    pickle.dump(obj, out); out.flush()
consts = {k: getattr(nbd, k) for k in dir(nbd) if k.isupper() and isinstance(getattr(nbd, k), int)}
send(("ready", consts))
handles = {}
while True:
    try:
        handle_id, name, args = pickle.load(inp)
    except EOFError:
        break
    try:
        if name == "__new__":
            handles[handle_id] = nbd.NBD()
            result = None
        else:
            result = getattr(handles[handle_id], name)(*args)
            if name == "close":
                del handles[handle_id]
        send(("ok", result))
    except nbd.Error as exc:
        send(("nbd_error", (exc.string, exc.errnum)))
    except Exception as exc:
        send(("error", repr(exc)))
"""


class ProxyError(Exception):
    """Stands in for nbd.Error: `.string`, `.errnum` (int) and `.errno` (its name)."""

    def __init__(self, string: str, errnum: int | None) -> None:
        super().__init__(string, errnum)
        self.string = string
        self.errnum = errnum
        self.errno = errno_module.errorcode.get(errnum) if errnum else None


class _ProxyModule(types.ModuleType):
    def __init__(self) -> None:
        super().__init__("nbd")
        self._proc = subprocess.Popen([SYSTEM_PYTHON, "-c", _SERVER], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE)
        atexit.register(self._proc.kill)
        kind, consts = pickle.load(self._proc.stdout)
        if kind != "ready":
            raise ImportError("libnbd proxy did not start")
        self.__dict__.update(consts)
        self.Error = ProxyError
        self._next_id = 0
        module = self

        class NBD:
            def __init__(self) -> None:
                module._next_id += 1
                self._id = module._next_id
                module._call(self._id, "__new__", ())

            def __getattr__(self, name):
                return lambda *args: module._call(self._id, name, args)

        self.NBD = NBD

    def close(self) -> None:
        """Stop the helper process (it would otherwise live until this one exits)."""
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc.stdout.close()

    def _call(self, handle_id: int, name: str, args: tuple):
        pickle.dump((handle_id, name, args), self._proc.stdin)
        self._proc.stdin.flush()
        ready, _, _ = select.select([self._proc.stdout], [], [], CALL_TIMEOUT)
        if not ready:
            self._proc.kill()
            raise TimeoutError(f"libnbd proxy: {name} did not answer in {CALL_TIMEOUT} s")
        kind, value = pickle.load(self._proc.stdout)
        if kind == "ok":
            return value
        if kind == "nbd_error":
            raise ProxyError(*value)
        raise RuntimeError(f"libnbd proxy: {name}{args!r}: {value}")
