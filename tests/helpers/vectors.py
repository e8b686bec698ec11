"""Captured requests and responses of the real 4.8 client and server."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data"
CAPTURE = DATA / "capture"
SAMPLES = DATA / "samples"


def captured_requests() -> dict[str, bytes]:
    """Every request archive the real client produced, by case name."""
    requests = {p.name[: -len(".request.zip")]: p.read_bytes()
                for p in sorted(CAPTURE.glob("*.request.zip"))}
    for p in sorted(SAMPLES.glob("req-*.zip")):
        requests[p.stem] = p.read_bytes()
    return requests


def members(archive: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        return {info.filename: z.read(info) for info in z.infolist()}


def arguments_of(archive: bytes) -> list[str]:
    files = members(archive)
    result = []
    index = 1
    while f"argv{index}" in files:
        result.append(files[f"argv{index}"].decode())
        index += 1
    return result
