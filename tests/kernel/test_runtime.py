"""Tests for stapsrv.kernel.runtime (the patched systemtap runtime)."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import threading
from pathlib import Path
from typing import Any, NoReturn

from twisted.trial.unittest import SkipTest, TestCase

from stapsrv.kernel import runtime
from tests.helpers import header_release

REAL_RUNTIME = Path(runtime.DEFAULT_STOCK_RUNTIME)

# A small file shaped like systemtap 4.8's runtime/stp_task_work.c: the lines
# the fix rewrites are identical, the rest is a minimal stand-in.
SYNTHETIC_TASK_WORK_C = """\
/* Test stand-in for runtime/stp_task_work.c. */
#ifndef _STP_TASK_WORK_C
#define _STP_TASK_WORK_C

#include "linux/task_work_compatibility.h"

#if !defined(STAPCONF_TASK_WORK_CANCEL_EXPORTED)
typedef typeof(&task_work_cancel) task_work_cancel_fn;
#define task_work_cancel (* (task_work_cancel_fn)kallsyms_task_work_cancel)
#endif

static int
stp_task_work_init(void)
{
#if !defined(STAPCONF_TASK_WORK_CANCEL_EXPORTED)
        kallsyms_task_work_cancel = \
                (void *)kallsyms_lookup_name("task_work_cancel");
        if (kallsyms_task_work_cancel == NULL)
                return -ENOENT;
#endif
        return 0;
}

static struct task_work *
stp_task_work_cancel(struct task_struct *task, task_work_func_t func)
{
        return task_work_cancel(task, func);
}

#endif /* _STP_TASK_WORK_C */
"""

SYNTHETIC_COMPAT_H = """\
/* Test stand-in for runtime/linux/task_work_compatibility.h. */
#include <linux/task_work.h>
#define task_work callback_head
"""

OLD_TASK_WORK_H = """\
typedef void (*task_work_func_t)(struct callback_head *);
struct callback_head *
task_work_cancel(struct task_struct *, task_work_func_t);
"""

NEW_TASK_WORK_H = """\
typedef void (*task_work_func_t)(struct callback_head *);
struct callback_head *
task_work_cancel_func(struct task_struct *, task_work_func_t);
bool task_work_cancel(struct task_struct *task, struct callback_head *cb);
"""


def make_fake_runtime(root: Path,
                      task_work_c: str = SYNTHETIC_TASK_WORK_C) -> Path:
    """Create a minimal runtime tree under *root* and return it."""
    (root / "linux").mkdir(parents=True)
    (root / "stp_task_work.c").write_text(task_work_c)
    compat = root / "linux" / "task_work_compatibility.h"
    compat.write_text(SYNTHETIC_COMPAT_H)
    (root / "linux" / "runtime.h").write_text("/* runtime */\n")
    (root / "runtime.h").write_text('#include "linux/runtime.h"\n')
    return root


def make_build_tree(root: Path, header: str | None) -> Path:
    """Create a flat kernel build tree, optionally with linux/task_work.h."""
    (root / "include" / "linux").mkdir(parents=True)
    if header is not None:
        (root / "include" / "linux" / "task_work.h").write_text(header)
    return root


def tree_modes(root: Path) -> set[tuple[str, int]]:
    """Return the distinct (kind, permission bits) pairs under root."""
    modes = {("dir", stat.S_IMODE(root.stat().st_mode))}
    for path in root.rglob("*"):
        kind = "dir" if path.is_dir() else "file"
        modes.add((kind, stat.S_IMODE(path.stat().st_mode)))
    return modes


class BuildTreeTests(TestCase):
    """build_tree_needs_task_work_fix() and header discovery."""

    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.base.mkdir()

    def test_flat_tree_with_renamed_helper(self) -> None:
        tree = make_build_tree(self.base / "build", NEW_TASK_WORK_H)
        self.assertTrue(runtime.build_tree_needs_task_work_fix(tree))

    def test_flat_tree_with_old_helper(self) -> None:
        tree = make_build_tree(self.base / "build", OLD_TASK_WORK_H)
        self.assertFalse(runtime.build_tree_needs_task_work_fix(str(tree)))

    def test_header_missing(self) -> None:
        tree = make_build_tree(self.base / "build", None)
        self.assertFalse(runtime.build_tree_needs_task_work_fix(tree))
        self.assertIsNone(runtime.find_task_work_header(tree))

    def test_build_tree_missing(self) -> None:
        self.assertFalse(
            runtime.build_tree_needs_task_work_fix(self.base / "nonexistent"))

    def test_debian_split_headers_via_makefile(self) -> None:
        common = make_build_tree(self.base / "hdr-common", NEW_TASK_WORK_H)
        arch = self.base / "weird-name"
        (arch / "include" / "generated").mkdir(parents=True)
        (arch / "Makefile").write_text(f"include {common}/Makefile\n")
        link = self.base / "build"
        link.symlink_to(arch)
        self.assertEqual(runtime.find_task_work_header(link),
                         common / "include" / "linux" / "task_work.h")
        self.assertTrue(runtime.build_tree_needs_task_work_fix(link))

    def test_debian_common_sibling(self) -> None:
        make_build_tree(self.base / "linux-headers-6.1.0-56-common",
                        NEW_TASK_WORK_H)
        arch = self.base / "linux-headers-6.1.0-56-amd64"
        (arch / "include" / "generated").mkdir(parents=True)
        self.assertTrue(runtime.build_tree_needs_task_work_fix(arch))

    def test_out_of_tree_build_source_link(self) -> None:
        sources = make_build_tree(self.base / "src", NEW_TASK_WORK_H)
        objects = self.base / "obj"
        objects.mkdir()
        (objects / "source").symlink_to(sources)
        self.assertTrue(runtime.build_tree_needs_task_work_fix(objects))


class ApplyFixTests(TestCase):
    """The text transformation of stp_task_work.c."""

    def test_fix_applied(self) -> None:
        fixed = runtime.apply_task_work_fix(SYNTHETIC_TASK_WORK_C)
        self.assertIn('"task_work_cancel_func"', fixed)
        self.assertIn("__builtin_types_compatible_p(typeof(&task_work_cancel)",
                      fixed)
        self.assertNotIn("typeof(&task_work_cancel) task_work_cancel_fn",
                         fixed)
        self.assertNotIn('kallsyms_lookup_name("task_work_cancel")', fixed)
        # The enum must be evaluated before task_work_cancel becomes a macro.
        self.assertLess(fixed.index("stp_task_work_cancel_renamed ="),
                        fixed.index("#define task_work_cancel "))

    def test_unexpected_text_raises(self) -> None:
        broken = SYNTHETIC_TASK_WORK_C.replace(
            "typedef typeof(&task_work_cancel)", "typedef typeof(&other)")
        error = self.assertRaises(RuntimeError, runtime.apply_task_work_fix,
                                  broken)
        self.assertIn("task_work_cancel_fn", str(error))

    def test_duplicate_text_raises(self) -> None:
        self.assertRaises(RuntimeError, runtime.apply_task_work_fix,
                          SYNTHETIC_TASK_WORK_C * 2)

    def test_already_fixed_raises(self) -> None:
        fixed = runtime.apply_task_work_fix(SYNTHETIC_TASK_WORK_C)
        self.assertRaises(RuntimeError, runtime.apply_task_work_fix, fixed)

    def test_real_stock_file(self) -> None:
        stock = REAL_RUNTIME / "stp_task_work.c"
        if not stock.is_file() or "task_work_cancel_func" in stock.read_text():
            raise SkipTest(f"no unfixed systemtap runtime at {REAL_RUNTIME}")
        fixed = runtime.apply_task_work_fix(stock.read_text())
        self.assertIn('"task_work_cancel_func"', fixed)


class RuntimeNeedsFixTests(TestCase):
    """runtime_needs_task_work_fix()."""

    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()

    def test_stock_needs_fix(self) -> None:
        self.assertTrue(runtime.runtime_needs_task_work_fix(
            make_fake_runtime(self.base)))

    def test_fixed_runtime_left_alone(self) -> None:
        fixed = runtime.apply_task_work_fix(SYNTHETIC_TASK_WORK_C)
        self.assertFalse(runtime.runtime_needs_task_work_fix(
            make_fake_runtime(self.base, fixed)))

    def test_no_runtime(self) -> None:
        self.assertFalse(runtime.runtime_needs_task_work_fix(self.base))


class PrepareFixedRuntimeTests(TestCase):
    """prepare_fixed_runtime(): naming, idempotence, races, permissions."""

    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.stock = make_fake_runtime(self.base / "stock")
        self.cache = self.base / "cache"

    def assertCacheHolds(self, *names: str) -> None:
        self.assertEqual(sorted(p.name for p in self.cache.iterdir()),
                         sorted(names))

    def test_prepared_copy(self) -> None:
        path = runtime.prepare_fixed_runtime(self.stock, self.cache)
        digest = runtime.runtime_digest(self.stock)
        self.assertEqual(path, self.cache / f"runtime-{digest}")
        self.assertTrue(re.fullmatch(r"runtime-[0-9a-f]{16}", path.name))
        self.assertTrue((path / runtime.MARKER_NAME).is_file())
        # Its time is every server's: a fleet's translators name the kernel
        # configuration header alike.
        self.assertEqual(path.stat().st_mtime, runtime.RUNTIME_TIME)
        self.assertEqual((path / "linux").stat().st_mtime, runtime.RUNTIME_TIME)
        self.assertIn('"task_work_cancel_func"',
                      (path / "stp_task_work.c").read_text())
        for name in ("runtime.h", "linux/runtime.h",
                     "linux/task_work_compatibility.h"):
            self.assertEqual((path / name).read_bytes(),
                             (self.stock / name).read_bytes())
        # The stock tree is untouched and no scratch directory is left over.
        self.assertEqual((self.stock / "stp_task_work.c").read_text(),
                         SYNTHETIC_TASK_WORK_C)
        self.assertCacheHolds(path.name)

    def test_idempotent(self) -> None:
        first = runtime.prepare_fixed_runtime(self.stock, self.cache)
        marker = (first / runtime.MARKER_NAME).stat()
        second = runtime.prepare_fixed_runtime(str(self.stock),
                                               str(self.cache))
        self.assertEqual(first, second)
        # Reused, not rebuilt.
        again = (second / runtime.MARKER_NAME).stat()
        self.assertEqual((marker.st_ino, marker.st_mtime_ns),
                         (again.st_ino, again.st_mtime_ns))
        self.assertCacheHolds(first.name)

    def test_digest_independent_of_location(self) -> None:
        other = self.base / "elsewhere"
        shutil.copytree(self.stock, other)
        self.assertEqual(runtime.runtime_digest(self.stock),
                         runtime.runtime_digest(other))

    def test_digest_follows_contents(self) -> None:
        first = runtime.prepare_fixed_runtime(self.stock, self.cache)
        (self.stock / "linux" / "runtime.h").write_text("/* changed */\n")
        second = runtime.prepare_fixed_runtime(self.stock, self.cache)
        self.assertNotEqual(first, second)
        linux = self.stock / "linux"
        (linux / "runtime.h").rename(linux / "x.h")
        third = runtime.prepare_fixed_runtime(self.stock, self.cache)
        self.assertNotIn(third, (first, second))
        self.assertTrue((first / runtime.MARKER_NAME).is_file())

    def test_digest_follows_fix_version(self) -> None:
        before = runtime.runtime_digest(self.stock)
        self.patch(runtime, "FIX_VERSION", runtime.FIX_VERSION + 1)
        self.assertNotEqual(before, runtime.runtime_digest(self.stock))

    def test_permissions(self) -> None:
        for path in [self.stock, *self.stock.rglob("*")]:
            path.chmod(0o700 if path.is_dir() else 0o600)
        self.addCleanup(self.stock.chmod, 0o755)
        path = runtime.prepare_fixed_runtime(self.stock, self.cache)
        self.assertEqual(tree_modes(path), {("dir", 0o755), ("file", 0o644)})

    def test_unexpected_stock_raises_and_leaves_nothing(self) -> None:
        (self.stock / "stp_task_work.c").write_text("/* something else */\n")
        self.assertRaises(RuntimeError, runtime.prepare_fixed_runtime,
                          self.stock, self.cache)
        self.assertCacheHolds()

    def test_not_a_runtime_raises(self) -> None:
        self.assertRaises(RuntimeError, runtime.prepare_fixed_runtime,
                          self.base / "nothing", self.cache)

    def test_incomplete_target_replaced(self) -> None:
        target = self.cache / f"runtime-{runtime.runtime_digest(self.stock)}"
        target.mkdir(parents=True)
        (target / "partial.c").write_text("")
        path = runtime.prepare_fixed_runtime(self.stock, self.cache)
        self.assertEqual(path, target)
        self.assertTrue((path / runtime.MARKER_NAME).is_file())
        self.assertFalse((path / "partial.c").exists())
        self.assertCacheHolds(target.name)

    def test_lost_race_reuses_winner(self) -> None:
        """Another process publishes the copy while we are building ours."""
        target = self.cache / f"runtime-{runtime.runtime_digest(self.stock)}"
        real_copytree = shutil.copytree

        def copytree_then_lose(src: Path, dst: Path, **kwargs: Any) -> Path:
            self.patch(runtime.shutil, "copytree", real_copytree)
            result = real_copytree(src, dst, **kwargs)
            target.mkdir()
            (target / "winner").write_text("")
            (target / runtime.MARKER_NAME).write_text("")
            return result

        self.patch(runtime.shutil, "copytree", copytree_then_lose)
        path = runtime.prepare_fixed_runtime(self.stock, self.cache)
        self.assertEqual(path, target)
        self.assertTrue((path / "winner").exists())
        self.assertCacheHolds(target.name)

    def test_concurrent_callers(self) -> None:
        results: list[Path] = []
        errors: list[BaseException] = []

        def worker() -> None:
            try:
                results.append(
                    runtime.prepare_fixed_runtime(self.stock, self.cache))
            except BaseException as error:  # reported below
                errors.append(error)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(errors, [])
        self.assertEqual(len(set(results)), 1)
        self.assertCacheHolds(results[0].name)
        self.assertTrue((results[0] / runtime.MARKER_NAME).is_file())


class SelectRuntimeTests(TestCase):
    """select_runtime()."""

    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.stock = make_fake_runtime(self.base / "stock")
        self.cache = self.base / "cache"

    def test_old_headers_use_stock(self) -> None:
        tree = make_build_tree(self.base / "build", OLD_TASK_WORK_H)
        self.assertIsNone(runtime.select_runtime(tree, self.stock, self.cache))
        self.assertFalse(self.cache.exists())

    def test_unknown_headers_use_stock(self) -> None:
        self.assertIsNone(
            runtime.select_runtime(self.base / "none", self.stock, self.cache))

    def test_new_headers_get_fixed_copy(self) -> None:
        tree = make_build_tree(self.base / "build", NEW_TASK_WORK_H)
        path = runtime.select_runtime(tree, self.stock, self.cache)
        self.assertEqual(path, runtime.prepare_fixed_runtime(self.stock,
                                                             self.cache))

    def test_fixed_stock_left_alone(self) -> None:
        tree = make_build_tree(self.base / "build", NEW_TASK_WORK_H)
        fixed = make_fake_runtime(
            self.base / "fixed",
            runtime.apply_task_work_fix(SYNTHETIC_TASK_WORK_C))
        self.assertIsNone(runtime.select_runtime(tree, fixed, self.cache))

    def test_default_cache_root(self) -> None:
        self.patch(os, "environ", {"XDG_CACHE_HOME": str(self.cache)})
        tree = make_build_tree(self.base / "build", NEW_TASK_WORK_H)
        path = runtime.select_runtime(tree, self.stock)
        assert path is not None
        self.assertEqual(path.parent, self.cache / "stapsrv")


# --- compiling the C change in user space ------------------------------------
#
# A mock <linux/task_work.h> (old or renamed API) plus a few stand-ins for
# kernel helpers let gcc compile and run stp_task_work.c as a normal program.
# This checks the prototype test picks the right symbol on both kinds of
# headers, which the real kernel build (renamed API only) cannot.

MOCK_TASK_WORK_H = """\
#ifndef MOCK_LINUX_TASK_WORK_H
#define MOCK_LINUX_TASK_WORK_H
#include <stdbool.h>
struct task_struct;
struct callback_head {
    struct callback_head *next;
    void (*func)(struct callback_head *);
};
typedef void (*task_work_func_t)(struct callback_head *);
static inline void init_task_work(struct callback_head *w, task_work_func_t f)
{
    w->func = f;
}
int task_work_add(struct task_struct *, struct callback_head *, int);
#ifdef MOCK_RENAMED
struct callback_head *task_work_cancel_func(struct task_struct *,
                        task_work_func_t);
bool task_work_cancel(struct task_struct *, struct callback_head *);
#else
struct callback_head *task_work_cancel(struct task_struct *, task_work_func_t);
#endif
#endif
"""

MOCK_HARNESS_C = """\
#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

typedef struct { int counter; } atomic_t;
#define ATOMIC_INIT(i) { (i) }
static int atomic_read(atomic_t *v) { return v->counter; }
static int atomic_inc_return(atomic_t *v) { return ++v->counter; }
static int atomic_dec_and_test(atomic_t *v) { return --v->counter == 0; }
#define DECLARE_WAIT_QUEUE_HEAD(name) int name
#define wait_event(wq, cond) do { } while (!(cond))
#define wake_up(wq) ((void)(wq))
#define _stp_error(...) fprintf(stderr, __VA_ARGS__)
static void *kallsyms_task_work_add;
static void *kallsyms_task_work_cancel;
static void *kallsyms_lookup_name(const char *name);

#include "stp_task_work.c"

static const char *cancel_symbol = "(none)";
static struct callback_head cancelled_work;
static task_work_func_t cancelled_func;

static struct callback_head *
mock_cancel(struct task_struct *task, task_work_func_t func)
{
    cancelled_func = func;
    return &cancelled_work;
}

static int mock_add(struct task_struct *t, struct callback_head *w, int n)
{
    return 0;
}

static void *kallsyms_lookup_name(const char *name)
{
    if (strncmp(name, "task_work_cancel", 16) == 0) {
        cancel_symbol = name;
        return (void *)mock_cancel;
    }
    return (void *)mock_add;
}

static void some_func(struct callback_head *head) { }

int main(void)
{
    if (stp_task_work_init() != 0)
        return 2;
    if (stp_task_work_cancel(NULL, some_func) != &cancelled_work
        || cancelled_func != some_func)
        return 3;
    printf("%s\\n", cancel_symbol);
    return 0;
}
"""


class CompileFixTests(TestCase):
    """Compile and run the fixed stp_task_work.c against mock headers."""

    def setUp(self) -> None:
        gcc = shutil.which("gcc")
        if gcc is None:
            raise SkipTest("gcc not installed")
        self.gcc = gcc
        self.base = Path(self.mktemp()).absolute()
        include = self.base / "mockinc" / "linux"
        include.mkdir(parents=True)
        (include / "task_work.h").write_text(MOCK_TASK_WORK_H)
        (self.base / "harness.c").write_text(MOCK_HARNESS_C)

    def build_and_run(self, runtime_dir: Path, renamed: bool) -> str:
        """Compile the harness against runtime_dir; return its output."""
        program = self.base / ("prog-renamed" if renamed else "prog-old")
        command = [self.gcc, "-std=gnu11", "-Werror",
                   "-I", str(self.base / "mockinc"), "-I", str(runtime_dir),
                   str(self.base / "harness.c"), "-o", str(program)]
        if renamed:
            command.append("-DMOCK_RENAMED")
        compiled = subprocess.run(command, capture_output=True, text=True)
        if compiled.returncode != 0:
            raise AssertionError(f"gcc failed:\n{compiled.stderr}")
        ran = subprocess.run([str(program)], capture_output=True, text=True)
        self.assertEqual(ran.returncode, 0, ran.stderr)
        return ran.stdout.strip()

    def check_runtime(self, stock: Path) -> None:
        # The stock file reproduces the pass-4 failure on renamed headers...
        self.assertRaises(AssertionError, self.build_and_run, stock, True)
        self.assertEqual(self.build_and_run(stock, False), "task_work_cancel")
        # ...and the fixed copy picks the right symbol on both.
        fixed = runtime.prepare_fixed_runtime(stock, self.base / "cache")
        self.assertEqual(self.build_and_run(fixed, False), "task_work_cancel")
        self.assertEqual(self.build_and_run(fixed, True),
                         "task_work_cancel_func")

    def test_synthetic_runtime(self) -> None:
        self.check_runtime(make_fake_runtime(self.base / "stock"))

    def test_real_runtime(self) -> None:
        if not runtime.runtime_needs_task_work_fix(REAL_RUNTIME):
            raise SkipTest(f"no unfixed systemtap runtime at {REAL_RUNTIME}")
        self.check_runtime(REAL_RUNTIME)


# --- the real thing ----------------------------------------------------------


class RealStapIntegrationTest(TestCase):
    """Build a module with stap -p4 and the selected runtime."""

    timeout = 900

    def missing(self, reason: str) -> NoReturn:
        if os.environ.get("CI") == "true":
            raise self.failureException(
                f"integration prerequisites missing under CI: {reason}")
        raise SkipTest(reason)

    def test_stap_p4_with_selected_runtime(self) -> None:
        stap = shutil.which("stap")
        if stap is None:
            self.missing("stap is not installed")
        if not (REAL_RUNTIME / "stp_task_work.c").is_file():
            self.missing(f"no systemtap runtime at {REAL_RUNTIME}")
        release = header_release()
        if release is None:
            self.missing("no kernel headers under /lib/modules/*/build")
        build = Path("/lib/modules") / release / "build"
        if not runtime.build_tree_needs_task_work_fix(build):
            self.missing(f"headers for {release} lack task_work_cancel_func")
        if not runtime.runtime_needs_task_work_fix(REAL_RUNTIME):
            self.missing(
                f"{REAL_RUNTIME} already handles task_work_cancel_func")

        base = Path(self.mktemp()).absolute()
        base.mkdir()
        selected = runtime.select_runtime(build, REAL_RUNTIME, base / "cache")
        assert selected is not None, "select_runtime() chose the stock runtime"
        fixed_c = (selected / "stp_task_work.c").read_text()
        self.assertIn('"task_work_cancel_func"', fixed_c)
        self.assertIn("stp_task_work_cancel_renamed", fixed_c)

        # Uprobes (process.begin) pull in the task_work code paths.
        script = 'probe process("/bin/true").begin { println(pid()) }'
        env = dict(os.environ, SYSTEMTAP_DIR=str(base / "stapdir"))
        result = subprocess.run(
            [stap, "-R", str(selected), "-r", release, "-p4", "-e", script],
            cwd=base, env=env, capture_output=True, text=True, timeout=800)
        self.assertEqual(result.returncode, 0,
                         f"stap -p4 failed:\n{result.stderr[-4000:]}")
        module = Path(result.stdout.strip().splitlines()[-1])
        self.assertTrue(module.name.startswith("stap_"), result.stdout)
        self.assertEqual(module.suffix, ".ko")
        self.assertTrue(module.is_file())
        self.assertIn(b"task_work_cancel_func", module.read_bytes())
