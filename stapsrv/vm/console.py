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
    # What staprun printed comes before /init's own markers, so a module
    # that prints a marker (a made-up "exit 0") is never taken for them:
    # the last exit marker is /init's, and the last errors marker before
    # it too (unless staprun's errors print one: then only the split of
    # output and errors is off, never the status).
    exits = list(_EXIT.finditer(text))
    status = int(exits[-1].group(1)) if exits else None
    end = exits[-1].start() - 1 if exits else len(text)
    start = text.find(f"{MARK} output@@\n")
    output = errors = ""
    if start >= 0:
        start += len(f"{MARK} output@@\n")
        split = text.rfind(f"\n{MARK} errors@@\n", start, end if exits else len(text))
        if split < 0:
            output = text[start:end] if exits else text[start:]
        else:
            output = text[start:split]
            errors = text[split + len(f"\n{MARK} errors@@\n"):end]
    return Outcome(booted, output, errors, status, text, timed_out, accelerator)
