"""The Debian suites a server fetches kernel releases from (``--fetch-suites``),
and the text of the private apt configuration made from them (sans-IO).

A suite is named by a word, ``NAME`` or ``NAME=URI``: without a URI a
suite ending in ``-security`` is taken from :data:`DEBIAN_SECURITY`, any
other from :data:`DEBIAN_MIRROR`.  Only the admin's configuration names
them; nothing a client sends reaches these words.

The configuration written from them is apt's own: a ``deb822`` sources
file (component ``main``, one architecture, ``Signed-By`` an archive
keyring, only the ``Packages`` indexes) and an ``apt.conf`` read with
``apt-get -c`` after the machine's own configuration, which points every
directory apt reads or writes (sources, preferences, keys, lists, cache,
package status) into the server's own directory, and keeps the archive's
signatures required.  This module also reads what apt answers:
the kernel series of the ``linux-headers-*`` names an archive holds, and
the suite ``apt-cache policy`` names for a version.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from attrs import frozen

DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SECURITY = "http://deb.debian.org/debian-security"
#: The keyring of Debian's archive signing keys (package debian-archive-keyring).
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
#: Debian's kernel flavours per architecture, beside the plain one.
EXTRA_FLAVOURS = ("cloud", "rt")

_SUITE = re.compile(r"[a-z0-9][a-z0-9.+_-]{0,63}")
_URI = re.compile(r"(https?|file):/{1,3}[A-Za-z0-9._~:/@%+-]+")
_ARCHITECTURE = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
#: ``6.1.0-41`` (bookworm and before), ``6.12.57+deb13``, ``6.12.115+deb13.1``,
#: ``6.10.11+bpo``.
_OLD_STYLE = re.compile(r"(\d+\.\d+\.\d+)-\d+")
_NEW_STYLE = re.compile(r"(\d+\.\d+)\.\d+(\+[a-z0-9]+(?:\.[0-9]+)?)")


class SuiteError(ValueError):
    """A word of ``--fetch-suites`` that is not a suite; one line."""


@frozen
class AptSuite:
    """One suite of one archive."""

    name: str
    uri: str


def parse_suites(values: Iterable[str]) -> tuple[AptSuite, ...]:
    """The suites named by ``values`` (words separated by commas or blanks),
    in order, each once.  Raises :class:`SuiteError`."""
    found: list[AptSuite] = []
    for value in values:
        for word in re.split(r"[\s,]+", value):
            if not word:
                continue
            name, equals, uri = word.partition("=")
            if not _SUITE.fullmatch(name):
                raise SuiteError(f"Not a Debian suite: {name!r} (lower-case letters, digits "
                                 "and . + _ -, e.g. bookworm-backports)")
            if equals and not _URI.fullmatch(uri):
                raise SuiteError(f"Not an archive URI for suite {name}: {uri!r} "
                                 "(http://, https:// or file:, no blanks or quotes)")
            if not equals:
                uri = DEBIAN_SECURITY if name.endswith("-security") else DEBIAN_MIRROR
            suite = AptSuite(name, uri.rstrip("/"))
            if suite not in found:
                found.append(suite)
    return tuple(found)


def check_architecture(architecture: str) -> str:
    """``architecture`` when it is a Debian architecture's shape; raises
    :class:`SuiteError`."""
    if not _ARCHITECTURE.fullmatch(architecture):
        raise SuiteError(f"Not a Debian architecture: {architecture!r}")
    return architecture


def sources_text(suites: Iterable[AptSuite], architecture: str, keyring: str) -> str:
    """A ``deb822`` sources file: one stanza per archive, its suites'
    ``main`` for ``architecture``, signed by ``keyring``, Packages only."""
    check_architecture(architecture)
    _check_quotable(keyring)
    by_uri: dict[str, list[str]] = {}
    for suite in suites:
        by_uri.setdefault(suite.uri, []).append(suite.name)
    stanzas = [f"Types: deb\nURIs: {uri}\nSuites: {' '.join(names)}\nComponents: main\n"
               f"Architectures: {architecture}\nSigned-By: {keyring}\nTargets: Packages\n"
               for uri, names in by_uri.items()]
    return "# Written by stapsrv from --fetch-suites; rewritten at each start.\n\n" + \
        "\n".join(stanzas)


#: Directories of the private configuration, relative to its base.
ETC, STATE, CACHE, LOG = "etc", "state", "cache", "log"
SOURCES_FILE = "etc/sources.list.d/stapsrv.sources"
STATUS_FILE = "state/status"


def apt_conf_text(base: str, architecture: str) -> str:
    """The ``apt.conf`` that ``apt-get -c`` reads after the machine's own:
    every directory under ``base``, one architecture, signatures required,
    no translations."""
    check_architecture(architecture)
    _check_quotable(base)
    base = base.rstrip("/")
    settings = [
        ("Dir::Etc", f"{base}/{ETC}/"),
        ("Dir::Etc::sourcelist", f"{base}/{ETC}/sources.list"),
        ("Dir::Etc::sourceparts", f"{base}/{ETC}/sources.list.d/"),
        ("Dir::Etc::preferences", f"{base}/{ETC}/preferences"),
        ("Dir::Etc::preferencesparts", f"{base}/{ETC}/preferences.d/"),
        ("Dir::Etc::trusted", f"{base}/{ETC}/trusted.gpg"),
        ("Dir::Etc::trustedparts", f"{base}/{ETC}/trusted.gpg.d/"),
        ("Dir::State", f"{base}/{STATE}/"),
        ("Dir::State::lists", f"{base}/{STATE}/lists/"),
        ("Dir::State::status", f"{base}/{STATUS_FILE}"),
        ("Dir::State::extended_states", f"{base}/{STATE}/extended_states"),
        ("Dir::Cache", f"{base}/{CACHE}/"),
        ("Dir::Cache::archives", f"{base}/{CACHE}/archives/"),
        ("Dir::Cache::pkgcache", f"{base}/{CACHE}/pkgcache.bin"),
        ("Dir::Cache::srcpkgcache", f"{base}/{CACHE}/srcpkgcache.bin"),
        ("Dir::Log", f"{base}/{LOG}/"),
        ("APT::Architecture", architecture),
        ("Acquire::Languages", "none"),
        ("Acquire::AllowInsecureRepositories", "false"),
        ("Acquire::AllowWeakRepositories", "false"),
        ("Acquire::AllowDowngradeToInsecureRepositories", "false"),
        ("APT::Get::AllowUnauthenticated", "false"),
    ]
    lines = ["// Written by stapsrv: the private apt configuration of its kernel store,",
             "// read with apt-get -c after the machine's own.  Rewritten at each start."]
    lines += [f'{name} "{value}";' for name, value in settings]
    lines += ["#clear APT::Architectures;", f'APT::Architectures {{ "{architecture}"; }};']
    return "\n".join(lines) + "\n"


def _check_quotable(text: str) -> None:
    if any(character in text for character in '"\n\\;{}') or not text:
        raise SuiteError(f"Cannot be written in apt's configuration: {text!r}")


def flavours(architecture: str) -> tuple[str, ...]:
    """``amd64``, ``cloud-amd64``, ``rt-amd64``: Debian's kernel flavours."""
    return (architecture, *(f"{extra}-{architecture}" for extra in EXTRA_FLAVOURS))


def series_patterns(packages: Iterable[str], architecture: str) -> tuple[str, ...]:
    """The release patterns of the kernel series whose headers are among
    ``packages`` (package names), for ``architecture``'s flavours:
    ``linux-headers-6.12.57+deb13-amd64`` gives ``6.12.*+deb13-amd64``,
    ``linux-headers-6.1.0-41-rt-amd64`` gives ``6.1.0-*-rt-amd64``."""
    found = set()
    # Longest first: "-rt-amd64" before "-amd64".
    kinds = sorted(flavours(architecture), key=len, reverse=True)
    for package in packages:
        if not package.startswith("linux-headers-"):
            continue
        release = package[len("linux-headers-"):]
        for flavour in kinds:
            if not release.endswith("-" + flavour):
                continue
            version = release[:-len(flavour) - 1]
            if (old := _OLD_STYLE.fullmatch(version)) is not None:
                found.add(f"{old.group(1)}-*-{flavour}")
            elif (new := _NEW_STYLE.fullmatch(version)) is not None:
                found.add(f"{new.group(1)}.*{new.group(2)}-{flavour}")
            break
    return tuple(sorted(found))


def policy_suite(text: str, version: str) -> str | None:
    """The suite that ``apt-cache policy`` output says ``version`` comes
    from (the first source listed under it), or None."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        line = line.replace("***", "   ")  # the installed version's mark
        words = line.split()
        if len(words) != 2 or words[0] != version:
            continue
        depth = len(line) - len(line.lstrip())
        for source in lines[index + 1:]:
            if len(source) - len(source.lstrip()) <= depth:
                break
            parts = source.split()  # "500 URI SUITE/COMPONENT ARCH Packages"
            if len(parts) >= 3 and parts[0].lstrip("-").isdigit():
                return parts[2].split("/", 1)[0]
        return None
    return None
