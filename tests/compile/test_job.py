"""A request parsed once (stapsrv.compile.job): the job says what the
unpacked directory says, and writing it unpacks exactly that."""

from __future__ import annotations

import os
from pathlib import Path

from twisted.trial.unittest import TestCase

from stapsrv.compile.archive import (
    RequestRejected,
    read_arguments,
    read_client_version,
    read_locale,
    read_target_release,
)
from stapsrv.compile.job import extract_request, needs_signature, parse_job, write_request
from stapsrv.core.cmdline import Privilege
from tests.helpers.archives import make_zip, request
from tests.helpers.vectors import captured_requests


class JobTests(TestCase):
    def unpack(self, body: bytes) -> Path:
        target = Path(self.mktemp())
        target.mkdir()
        extract_request(body, target, 50000)
        return target

    def test_the_job_reads_as_the_unpacked_request(self) -> None:
        for name, body in captured_requests().items():
            job = parse_job(body, 50000)
            directory = self.unpack(body)
            self.assertEqual(job.client_version, read_client_version(directory), name)
            self.assertEqual(job.release, read_target_release(directory), name)
            self.assertEqual(list(job.arguments),
                             [os.fsdecode(a) for a in read_arguments(directory)], name)
            self.assertEqual(job.locale, read_locale(directory), name)

    def test_privilege_signature_and_mok(self) -> None:
        job = parse_job(request("--privilege=stapsys", "-p4"), 50000)
        self.assertEqual(job.privilege, Privilege.STAPSYS)
        self.assertTrue(needs_signature(job))
        self.assertFalse(job.wants_mok)
        self.assertTrue(job.speaks_locale)
        odd = parse_job(request("--privilege=root"), 50000)
        self.assertEqual((odd.privilege, odd.invalid_privilege), (Privilege.STAPDEV, "root"))
        old = parse_job(request("-p4", version=b"1.5"), 50000)
        self.assertFalse(old.speaks_locale)

    def test_written_request_holds_every_member(self) -> None:
        body = make_zip([("argv1", b"script/a.stp", 0o100644), ("script/", b"", 0o40755),
                         ("script/a.stp", b"probe begin {}", 0o100644)])
        target = Path(self.mktemp())
        target.mkdir()
        write_request(parse_job(body, 50000), target)
        self.assertEqual((target / "script" / "a.stp").read_bytes(), b"probe begin {}")
        self.assertEqual((target / "argv1").read_bytes(), b"script/a.stp")

    def test_refusals_come_from_parsing(self) -> None:
        with self.assertRaises(RequestRejected) as caught:
            parse_job(request("-p4", "-e" + "x" * 200), 100)
        self.assertIsNotNone(caught.exception.client_message)
        self.assertRaises(RequestRejected, parse_job, b"PK\x03\x04garbage", 50000)
