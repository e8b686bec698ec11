"""Shared hypothesis settings and strategies for the property-based tests."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from stapsrv.core.cmdline import LONG_OPTIONS, SHORT_OPTIONS


class FalsifiedProperty(Exception):
    """A failure whose own message cannot carry hypothesis's example."""


def _notes(exc: BaseException) -> str:
    """The notes of ``exc``, or of each failure in an exception group."""
    lines = list(getattr(exc, "__notes__", ()))
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            lines += [f"--- {type(inner).__name__}: {inner}", _notes(inner)]
    return "\n".join(lines)


def fixed(max_examples: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Deterministic settings (the same examples on every run, no database,
    no deadline: the file system and the CI machine set the pace), and the
    falsifying example shown in trial's report.

    Hypothesis attaches the example as an exception note, which trial does
    not print; it is copied into the message (or the failure is wrapped in
    ``FalsifiedProperty`` when its message cannot take it).
    """
    chosen = settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much],
    )

    def decorate(test: Callable[..., Any]) -> Callable[..., Any]:
        configured = chosen(test)

        @functools.wraps(configured)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return configured(*args, **kwargs)
            except Exception as exc:
                notes = _notes(exc)
                if not notes:
                    raise
                if isinstance(exc, BaseExceptionGroup) or not (
                        exc.args and isinstance(exc.args[0], str)):
                    raise FalsifiedProperty(f"{type(exc).__name__}: {exc}\n{notes}") from exc
                exc.args = (f"{exc.args[0]}\n{notes}",) + exc.args[1:]
                raise

        return run

    return decorate


#: Words that matter to the server or the translator when a client sends them.
INTERESTING_WORDS = (
    "--", "-", "-o", "-ofile", "--tmpdir", "--tmpdir=/etc", "--tmp=/x", "-R", "-R/rt",
    "-B", "-BCONFIG_X=y", "-r", "-r/usr/src/linux", "-r6.1.0", "-k", "-q", "-i",
    "-c", "-cid", "-e", "-eprobe begin {}", "-p4", "-p", "-pe", "-vve", "-kgv",
    "--sign-module", "--sign-module=/etc/shadow", "--sign-module=", "--sign",
    "--si=x", "--s", "--privilege", "--privilege=stapusr", "--privilege=stapsys",
    "--privilege=stapdev", "--privilege=root", "--priv=stapusr", "--p=stapusr",
    "--unprivileged", "--unpriv", "--client-options", "--use-server", "--use-server=h",
    "--runtime=bpf", "--vp", "--vp=0001", "--col", "--color=never", "--bogus",
    "script/x.stp", "stapusr", "stapsys", "",
)

_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=126) | st.sampled_from("\n\t "),
                max_size=12)


@st.composite
def _long_option(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(sorted(LONG_OPTIONS)))
    cut = draw(st.integers(1, len(name)))
    word = "--" + name[:cut]
    if draw(st.booleans()):
        word += "=" + draw(_TEXT)
    return word


@st.composite
def _short_bundle(draw: st.DrawFn) -> str:
    letters = draw(st.text(st.sampled_from(SHORT_OPTIONS.replace(":", "") + "-:zZ?"),
                           min_size=1, max_size=4))
    return "-" + letters + draw(st.sampled_from(["", "", "x", "stapusr", "--privilege=stapusr"]))


#: One client argument as ``argvN`` would carry it (ASCII, so that one
#: character is one byte for getopt).
client_word = st.one_of(
    st.sampled_from(INTERESTING_WORDS), _long_option(), _short_bundle(), _TEXT)
client_arguments = st.lists(client_word, max_size=12)
