"""What the VM's serial console said, read back into what ``staprun``
printed and how it ended.  Sans-IO: the console text in, an
:class:`Outcome` out.  The console turns every newline into CR LF and may
carry terminal escapes before the first marker: markers are matched where
they are, not at line starts."""

from __future__ import annotations

import re

from attrs import frozen

from stapsrv.vm.initramfs import MARK

_EXIT = re.compile(re.escape(MARK) + r" exit (\d+)@@")


@frozen
class Outcome:
    """``booted``: ``/init`` ran; ``output`` and ``errors``: staprun's
    standard output and error; ``status``: its exit status (``None`` when
    the VM ended before saying); ``console``: everything, for reports."""

    booted: bool
    output: str
    errors: str
    status: int | None
    console: str
    timed_out: bool = False
    #: The accelerator the VM ran with ("kvm" or "tcg").
    accelerator: str = "tcg"

    @property
    def ran(self) -> bool:
        return self.status == 0

    def summary(self) -> str:
        """One line: what went wrong, or how it ended."""
        if self.status == 0:
            return "runs"
        if self.status is not None:
            last = [line for line in self.errors.splitlines() if line.strip()]
            return f"staprun exit {self.status}: {last[-1] if last else 'no message'}"
        if self.timed_out:
            return "the VM did not finish in time" + ("" if self.booted else
                                                      " (the kernel never ran /init)")
        return "the VM ended before staprun did" + ("" if self.booted else
                                                     " (the kernel never ran /init)")


def read_console(raw: bytes, timed_out: bool = False, accelerator: str = "tcg") -> Outcome:
    text = raw.decode(errors="replace").replace("\r\n", "\n").replace("\r", "")
    booted = f"{MARK} init@@" in text
    output = _between(text, f"{MARK} output@@\n", f"\n{MARK} errors@@\n")
    errors = _between(text, f"{MARK} errors@@\n", f"\n{MARK} exit ")
    found = _EXIT.search(text)
    status = int(found.group(1)) if found else None
    return Outcome(booted, output or "", errors or "", status, text, timed_out, accelerator)


def _between(text: str, start: str, end: str) -> str | None:
    begin = text.find(start)
    if begin < 0:
        return None
    begin += len(start)
    finish = text.find(end, begin)
    return text[begin:finish] if finish >= 0 else text[begin:]
