"""No silent skips: every skip is printed at the end of the run, and a skip whose reason is not
on ALLOWED_SKIPS fails the run (a missing test dependency or tool is a failure, not a skip)."""

from __future__ import annotations

import re

import pytest

from synth import decisive_guard

# Reasons a test may skip: properties of the machine, never of the installation.
ALLOWED_SKIPS = (
    r"^CPU lacks ",  # a kernel path for a CPU feature this machine does not have (e.g. avx512vnni)
    r"^no SIMD path for ",  # a CPU architecture without a SIMD kernel path (not x86-64 or aarch64)
    r"^numpy here is not linked to an OpenBLAS",  # numpy built against another BLAS
)

_skips: list[tuple[str, str]] = []


def _record(report) -> None:
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = re.sub(r"^Skipped: ", "", str(report.longrepr[2]))
        _skips.append((report.nodeid, reason))


def pytest_runtest_logreport(report) -> None:
    _record(report)


def pytest_collectreport(report) -> None:
    _record(report)


def pytest_terminal_summary(terminalreporter) -> None:
    if _skips:
        terminalreporter.section("skips")
        for node, reason in _skips:
            allowed = any(re.search(p, reason) for p in ALLOWED_SKIPS)
            terminalreporter.write_line(f"{'allowed' if allowed else 'NOT ALLOWED'}: {node}: {reason}")


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus) -> None:
    if any(not any(re.search(p, r) for p in ALLOWED_SKIPS) for _, r in _skips) and exitstatus == 0:
        session.exitstatus = 1


# ---------------------------------------------------------------- the decisive model, built once per run

@pytest.fixture(scope="session")
def decisive_paths(tmp_path_factory) -> dict:
    """The decisive model's files (tests/synth.py), one per head, shared by every test file."""
    d = tmp_path_factory.getbasetemp() / "decisive-shared"
    d.mkdir(exist_ok=True)
    return {head: decisive_guard(str(d), head) for head in ("guard", "full")}


@pytest.fixture(scope="session")
def decisive_path(decisive_paths) -> str:
    return decisive_paths["guard"]


@pytest.fixture(scope="module")
def cold(decisive_path):
    """A guard without a token-prefix cache: what every cached or streamed result must equal."""
    from pyguard import Guard

    return Guard.load(decisive_path, threads=2, cache_bytes=0)
