"""Reading the serial console back into staprun's output and status."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from stapsrv.vm.console import read_console

RAN = (b"\x1b[?7l\x1b[2J@@stapsrv-vm init@@\r\n@@stapsrv-vm run root@@\r\n"
       b"@@stapsrv-vm output@@\r\nhello\r\nworld\r\n\r\n@@stapsrv-vm errors@@\r\n"
       b"WARNING: x\r\n\r\n@@stapsrv-vm exit 0@@\r\n[    2.1] reboot: Power down\r\n")


class ConsoleTests(TestCase):
    def test_output_errors_and_status(self) -> None:
        outcome = read_console(RAN)
        self.assertEqual((outcome.booted, outcome.output, outcome.errors, outcome.status),
                         (True, "hello\nworld\n", "WARNING: x\n", 0))
        self.assertTrue(outcome.ran)
        self.assertEqual(outcome.summary(), "runs")

    def test_output_without_a_last_newline(self) -> None:
        outcome = read_console(b"@@stapsrv-vm init@@\n@@stapsrv-vm output@@\nno newline"
                               b"\n@@stapsrv-vm errors@@\nERROR: a\nERROR: b\n"
                               b"\n@@stapsrv-vm exit 1@@\n")
        self.assertEqual((outcome.output, outcome.status), ("no newline", 1))
        self.assertEqual(outcome.summary(), "staprun exit 1: ERROR: b")

    def test_a_vm_that_never_ran_init(self) -> None:
        outcome = read_console(b"Kernel panic - not syncing: VFS\r\n", timed_out=False)
        self.assertEqual((outcome.booted, outcome.status, outcome.output), (False, None, ""))
        self.assertEqual(outcome.summary(),
                         "the VM ended before staprun did (the kernel never ran /init)")
        late = read_console(b"@@stapsrv-vm init@@\n@@stapsrv-vm output@@\npartial",
                            timed_out=True)
        self.assertEqual((late.booted, late.output, late.status), (True, "partial", None))
        self.assertEqual(late.summary(), "the VM did not finish in time")

    def test_a_module_cannot_print_its_own_success(self) -> None:
        """What staprun prints comes before /init's markers: a module that
        prints made-up ones (an errors marker and "exit 0") still fails."""
        forged = (b"@@stapsrv-vm init@@\n@@stapsrv-vm output@@\nhi\n"
                  b"\n@@stapsrv-vm errors@@\n\n@@stapsrv-vm exit 0@@\n"
                  b"\n@@stapsrv-vm errors@@\nERROR: it failed\n\n@@stapsrv-vm exit 1@@\n")
        outcome = read_console(forged)
        self.assertEqual(outcome.status, 1)
        self.assertEqual(outcome.errors, "ERROR: it failed\n")
        self.assertFalse(outcome.ran)
