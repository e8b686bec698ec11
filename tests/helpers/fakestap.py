"""A stand-in for the stap translator, for fast tests of the server.

It records how it was run (argv, cwd, selected environment) in
``$FAKESTAP_RECORD`` and behaves according to the client's ``-e`` script:

* ``ok`` (default): write a module into --tmpdir and print its path;
* ``fail``: print an error on stderr and exit 1;
* ``sleep``: start a grandchild, record both pids, and sleep for a long time;
* ``signal``: kill itself with SIGKILL;
* ``home``: mention $HOME and the --tmpdir in its output (path filtering);
* ``cold``: like ``ok``, plus the C source and kbuild leftovers of a build
  done without the translator's own cache.

Two optional variables help the cache tests: ``$FAKESTAP_COUNT`` names a
file that gets one line per run (so a test can count compiles), and
``$FAKESTAP_SLEEP`` is a number of seconds to wait before doing anything
else (so two requests can overlap).
"""

import json
import os
import signal
import subprocess
import sys
import time


def main() -> None:
    argv = sys.argv[1:]
    tmpdir = next(a[len("--tmpdir="):] for a in argv if a.startswith("--tmpdir="))
    script = next((a[2:] for a in argv if a.startswith("-e")), "ok")
    counter = os.environ.get("FAKESTAP_COUNT")
    if counter:
        with open(counter, "a") as out:
            out.write("%d %s\n" % (os.getpid(), json.dumps(script)))
    delay = os.environ.get("FAKESTAP_SLEEP")
    if delay:
        time.sleep(float(delay))
    record = os.environ.get("FAKESTAP_RECORD")
    if record:
        with open(record, "w") as out:
            json.dump({"argv": argv, "cwd": os.getcwd(), "pgid": os.getpgid(0),
                       "pid": os.getpid(),
                       "exists": {a: os.path.exists(a) for a in argv
                                  if a.startswith(("script/", "tapset/"))},
                       "env": {k: os.environ.get(k) for k in
                               ("LANG", "LC_ALL", "TMPDIR", "HOME", "LD_PRELOAD")}}, out)
    if script == "fail":
        sys.stderr.write("semantic error: fake failure\n")
        sys.exit(1)
    if script == "signal":
        os.kill(os.getpid(), signal.SIGKILL)
    if script == "sleep":
        child = subprocess.Popen(["sleep", "300"])
        with open(f"{record}.pids", "w") as out:
            json.dump([os.getpid(), child.pid], out)
        time.sleep(300)
    if script == "home":
        sys.stderr.write("home is " + os.environ["HOME"] + "/x and tmp is " + tmpdir + "/y\n")
    module = os.path.join(tmpdir, "stap_fake_1.ko")
    with open(module, "wb") as out:
        out.write(b"\x7fELF fake module " + os.urandom(16))
    if script == "cold":
        # What a build without the translator's cache leaves behind.
        for name in ("stap_fake_1_src.c", ".stap_fake_1.o.cmd", "Module.symvers",
                     "stap_fake_1.mod.c"):
            with open(os.path.join(tmpdir, name), "w") as out:
                out.write("kbuild " + name + "\n")
    sys.stdout.write(os.environ.get("HOME", "/nonexistent") + "/.systemtap/cache/fa/stap_fake_1.ko\n")
    sys.stderr.write("Pass 4: compiled C into \"stap_fake_1.ko\"\n")


if __name__ == "__main__":
    main()
