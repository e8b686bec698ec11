"""Choose, and if needed prepare, the SystemTap runtime used for pass 4.

Debian bookworm ships systemtap 4.8, whose kernel runtime predates the
upstream kernel change
"task_work: s/task_work_cancel()/task_work_cancel_func()/" (mainline 6.11,
backported to stable kernels such as 6.1.103).  Since that change
``task_work_cancel()`` cancels a single ``callback_head`` and returns
``bool``, while the old cancel-by-function behaviour is called
``task_work_cancel_func()``.  The stock ``stp_task_work.c`` still uses the
old meaning, so every module build against such headers fails in pass 4.

The installed files are never touched.  Instead the stock runtime is copied
into a cache directory whose name is derived from the stock runtime's
contents, the copy is patched, and ``stap -R <copy>`` is used.  The name must
stay stable because stap keys its stapconf (autoconf) cache on the runtime
path.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Final

__all__ = [
    "DEFAULT_STOCK_RUNTIME",
    "FIX_VERSION",
    "MARKER_NAME",
    "apply_task_work_fix",
    "build_tree_needs_task_work_fix",
    "default_cache_root",
    "find_task_work_header",
    "prepare_fixed_runtime",
    "runtime_digest",
    "runtime_needs_task_work_fix",
    "select_runtime",
]

#: Where Debian's systemtap package installs the kernel runtime.
DEFAULT_STOCK_RUNTIME: Final = "/usr/share/systemtap/runtime"

#: Bump whenever the C transformation below changes; it is part of the
#: cache digest, so a new fix never reuses a copy made by an old one.
FIX_VERSION: Final = 1

#: Written last into a prepared runtime; its presence means "complete".
MARKER_NAME: Final = ".stapsrv-runtime-complete"

_TASK_WORK_FILE: Final = "stp_task_work.c"
_NEW_SYMBOL: Final = "task_work_cancel_func"
_DIGEST_CHARS: Final = 16

# --- the C fix ---------------------------------------------------------------
#
# Each entry is (expected stock text, replacement).  Every expected text must
# occur exactly once in the stock file, otherwise we refuse to produce a copy.
#
# The compile-time test below asks the compiler which prototype the kernel
# headers declare, instead of comparing LINUX_VERSION_CODE: the rename reached
# each stable branch at a different sublevel (6.1.103 on 6.1.y, while mainline
# 6.2 .. 6.10 never had it), so no single version threshold is right.  On
# kernels with the old prototype the constant is 0 and the code behaves as
# before; STAPCONF_TASK_WORK_STRUCT kernels (3.6, pre-callback_head) are
# excluded so that the test never names a type those headers lack.


def _kernel_style(text: str) -> str:
    """Turn each leading run of eight spaces into a tab (kernel C style).

    The C below is written with spaces so that this file stays free of
    tabs; the patched runtime gets the tabs its own code uses.
    """
    lines = []
    for line in text.splitlines(keepends=True):
        body = line.lstrip(" ")
        tabs, spaces = divmod(len(line) - len(body), 8)
        lines.append("\t" * tabs + " " * spaces + body)
    return "".join(lines)


_TYPEDEF_OLD: Final = """\
#if !defined(STAPCONF_TASK_WORK_CANCEL_EXPORTED)
typedef typeof(&task_work_cancel) task_work_cancel_fn;
"""

_TYPEDEF_NEW: Final = _kernel_style(f"""\
#if !defined(STAPCONF_TASK_WORK_CANCEL_EXPORTED)
/*
 * stapsrv runtime fix {FIX_VERSION}: kernels with upstream commit
 * "task_work: s/task_work_cancel()/task_work_cancel_func()/" (6.11, and
 * stable backports such as 6.1.103) call the cancel-by-function helper
 * task_work_cancel_func(); task_work_cancel() now takes a callback_head
 * and returns bool.  Detect that from the declared prototype, because the
 * version where it appeared differs per stable branch.  This must be an
 * enum: task_work_cancel is redefined as a macro just below.
 */
enum {{
        stp_task_work_cancel_renamed =
#if defined(STAPCONF_TASK_WORK_STRUCT)
                0
#else
                __builtin_types_compatible_p(typeof(&task_work_cancel),
                        bool (*)(struct task_struct *, struct callback_head *))
#endif
}};
/* Cancel-by-function prototype, whichever name the kernel gives it. */
typedef struct task_work *(*task_work_cancel_fn)(struct task_struct *,
                                                  task_work_func_t);
""")

_LOOKUP_OLD: Final = 'kallsyms_lookup_name("task_work_cancel");\n'

_LOOKUP_NEW: Final = _kernel_style(f"""\
kallsyms_lookup_name(
                stp_task_work_cancel_renamed ? "{_NEW_SYMBOL}"
                                             : "task_work_cancel");
""")

_REPLACEMENTS: Final[tuple[tuple[str, str], ...]] = (
    (_TYPEDEF_OLD, _TYPEDEF_NEW),
    (_LOOKUP_OLD, _LOOKUP_NEW),
)


# --- kernel build tree inspection --------------------------------------------

_MAKEFILE_INCLUDE: Final = re.compile(
    r"^\s*-?include\s+(\S+)/Makefile\s*$", re.M)


def _header_roots(build_tree: Path) -> list[Path]:
    """Return directories that may hold the kernel's ``include/`` tree.

    Besides the build tree itself this covers ``make O=...`` trees (whose
    ``source`` link points at the sources) and Debian's split packages: the
    flavour directory (``linux-headers-X-amd64``) only carries generated
    files and a one-line Makefile including ``linux-headers-X-common``.
    """
    roots = [build_tree, build_tree / "source"]
    try:
        makefile = (build_tree / "Makefile").read_text(errors="replace")
    except OSError:
        makefile = ""
    for match in _MAKEFILE_INCLUDE.finditer(makefile):
        included = Path(match.group(1))
        if not included.is_absolute():
            included = build_tree / included
        roots.append(included)
    # Fallback for Debian's layout if the Makefile is unusual.
    resolved = build_tree.resolve()
    prefix, sep, _flavour = resolved.name.rpartition("-")
    if sep and prefix:
        roots.append(resolved.with_name(f"{prefix}-common"))
    return roots


def find_task_work_header(build_tree: str | os.PathLike[str]) -> Path | None:
    """Return the ``linux/task_work.h`` a module build would use, if any."""
    for root in _header_roots(Path(build_tree)):
        header = root / "include" / "linux" / "task_work.h"
        if header.is_file():
            return header
    return None


def build_tree_needs_task_work_fix(build_tree: str | os.PathLike[str]) -> bool:
    """Tell whether the kernel headers declare ``task_work_cancel_func``.

    Returns False when the header cannot be found or read, since the stock
    runtime is then the best guess.
    """
    header = find_task_work_header(build_tree)
    if header is None:
        return False
    try:
        text = header.read_text(errors="replace")
    except OSError:
        return False
    return re.search(rf"\b{_NEW_SYMBOL}\s*\(", text) is not None


def runtime_needs_task_work_fix(runtime_dir: str | os.PathLike[str]) -> bool:
    """Tell whether a runtime still lacks support for the renamed helper.

    A runtime that already mentions ``task_work_cancel_func`` (a newer
    systemtap, or a copy we patched) is left alone, as is a directory that
    has no ``stp_task_work.c`` at all.
    """
    try:
        path = Path(runtime_dir) / _TASK_WORK_FILE
        text = path.read_text(errors="replace")
    except OSError:
        return False
    return _NEW_SYMBOL not in text


# --- preparing the patched copy ----------------------------------------------


def apply_task_work_fix(source: str) -> str:
    """Return the text of ``stp_task_work.c`` with the fix applied.

    Raises RuntimeError when the stock text is not what the fix expects,
    rather than producing a copy that would fail (or misbehave) later.
    """
    fixed = source
    for old, new in _REPLACEMENTS:
        count = fixed.count(old)
        if count != 1:
            raise RuntimeError(
                f"cannot apply stapsrv task_work fix to {_TASK_WORK_FILE}: "
                f"expected exactly one occurrence of {old.strip()!r}, "
                f"found {count}; this systemtap runtime is not supported"
            )
        fixed = fixed.replace(old, new)
    assert _NEW_SYMBOL in fixed
    return fixed


def _runtime_files(root: Path) -> list[tuple[str, Path]]:
    """List ``(relative posix path, path)`` for every file under *root*."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            path = Path(dirpath, name)
            files.append((path.relative_to(root).as_posix(), path))
    files.sort()
    return files


def runtime_digest(runtime_dir: str | os.PathLike[str]) -> str:
    """Return a short hex digest of a runtime's file names and contents.

    FIX_VERSION is included, so changing the fix changes the digest too.
    """
    root = Path(runtime_dir)
    digest = hashlib.sha256(f"stapsrv-runtime-fix {FIX_VERSION}\n".encode())
    for relative, path in _runtime_files(root):
        name = relative.encode()
        data = path.read_bytes()
        # Length prefixes keep (name, data) boundaries unambiguous.
        digest.update(b"%d:%s%d:" % (len(name), name, len(data)))
        digest.update(data)
    return digest.hexdigest()[:_DIGEST_CHARS]


def _make_world_readable(root: Path) -> None:
    """Set directories to 0755 and files to 0644 under (and including) root."""
    os.chmod(root, 0o755)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)


def _is_complete(runtime_dir: Path) -> bool:
    return (runtime_dir / MARKER_NAME).is_file()


#: The time stamp of every fixed runtime's directory (its contents are
#: named by their digest; 2001-09-09).
RUNTIME_TIME = 1_000_000_000
#: The runtime's directories whose time SystemTap 4.8 hashes besides its own.
HASHED_DIRECTORIES = ("transport", "unwind", "linux")


def prepare_fixed_runtime(
    stock_runtime: str | os.PathLike[str],
    cache_root: str | os.PathLike[str],
) -> Path:
    """Return a patched copy of *stock_runtime* under *cache_root*.

    The copy lives in ``cache_root/runtime-<digest>``, where the digest
    covers the stock files and FIX_VERSION, so the same stock runtime always
    maps to the same path.  The copy is assembled in a private temporary
    directory inside *cache_root*, finished with a marker file, and renamed
    into place, so concurrent callers either reuse a complete copy or
    publish an identical one.  The returned path is absolute, as ``stap -R``
    is used from other working directories.
    """
    stock = Path(os.path.abspath(stock_runtime))
    cache = Path(os.path.abspath(cache_root))
    if not (stock / _TASK_WORK_FILE).is_file():
        raise RuntimeError(f"{stock} is not a systemtap runtime "
                           f"(no {_TASK_WORK_FILE})")
    target = cache / f"runtime-{runtime_digest(stock)}"
    if _is_complete(target):
        _settle_times(target)  # one made before the times were fixed
        return target

    cache.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".runtime-tmp-", dir=cache))
    try:
        work = scratch / "runtime"
        shutil.copytree(stock, work)
        # Name the result after what was actually copied, in case the stock
        # runtime changed (package upgrade) since the digest above.
        target = cache / f"runtime-{runtime_digest(work)}"
        task_work = work / _TASK_WORK_FILE
        text = task_work.read_text(encoding="utf-8", errors="surrogateescape")
        task_work.write_text(apply_task_work_fix(text), encoding="utf-8",
                             errors="surrogateescape")
        (work / MARKER_NAME).write_text(
            f"stapsrv runtime fix {FIX_VERSION}\nstock: {stock}\n"
        )
        _make_world_readable(work)
        # The translator names its kernel configuration header after the
        # runtime's path, size and time too: the same time on every server
        # lets a fleet share the header (stapsrv.compile.sharedconf).
        _settle_times(work)
        _publish(work, target, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _settle_times(runtime: Path) -> None:
    """The fixed time on the runtime's hashed directories (best effort: a
    copy another user made stays as it is)."""
    for directory in (runtime, *(runtime / name for name in HASHED_DIRECTORIES)):
        try:
            if directory.stat().st_mtime != RUNTIME_TIME:
                os.utime(directory, (RUNTIME_TIME, RUNTIME_TIME))
        except OSError:
            pass


def _publish(work: Path, target: Path, scratch: Path) -> None:
    """Rename *work* to *target* unless a complete copy is already there."""
    for _attempt in range(3):
        if _is_complete(target):
            return
        try:
            os.rename(work, target)
            return
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        if _is_complete(target):
            return
        # An incomplete directory (left by hand or an old crash) is in the
        # way; move it into our scratch directory, which gets deleted.
        try:
            os.rename(target, scratch / f"stale-{_attempt}")
        except FileNotFoundError:
            pass
    raise RuntimeError(f"could not publish prepared runtime at {target}")


# --- selection ---------------------------------------------------------------


def default_cache_root() -> Path:
    """Return the per-user cache directory for prepared runtimes."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "stapsrv"


def select_runtime(
    build_tree: str | os.PathLike[str],
    stock_runtime: str | os.PathLike[str] = DEFAULT_STOCK_RUNTIME,
    cache_root: str | os.PathLike[str] | None = None,
) -> Path | None:
    """Return the runtime to pass to ``stap -R``, or None for the stock one.

    None means no fix is needed: either the kernel headers predate the
    rename (or cannot be inspected), or the stock runtime already handles it.
    """
    if not build_tree_needs_task_work_fix(build_tree):
        return None
    if not runtime_needs_task_work_fix(stock_runtime):
        return None
    if cache_root is None:
        cache_root = default_cache_root()
    return prepare_fixed_runtime(stock_runtime, cache_root)
