"""Test sessions. They run in the current environment (the README's `.venv`): installing
torch a second time per session would cost minutes and gigabytes for nothing."""

import sys

import nox

nox.options.default_venv_backend = "none"
nox.options.sessions = ["tests"]
PY = sys.executable  # the interpreter nox runs under: the project's venv


@nox.session
def tests(session: nox.Session) -> None:
    """The default CPU suite (not slow, not gpu): what CI runs, on two pytest-xdist workers, one a core of CI's
    two, each test file on one worker (its module fixtures built once). Serial it took 31-33 min there: most
    end-to-end tests wait on a one-thread subprocess importing torch and diffusers, a core idle. It names its 15
    slowest tests at the end, so a CI log shows where the time goes. `nox -s tests -- -n 0` runs it serially."""
    session.run(PY, "-m", "pytest", "-q", "-n", "2", "--dist", "loadfile", "--durations=15",
                "-m", "not slow and not gpu", *session.posargs)


@nox.session
def unit(session: nox.Session) -> None:
    """The fast unit tier: the default suite less the end-to-end (`e2e`) tests."""
    session.run(PY, "-m", "pytest", "-q", "-m", "not slow and not gpu and not e2e", *session.posargs)


@nox.session
def threads1(session: nox.Session) -> None:
    """The unit tier at one OpenMP thread: the tolerances must hold at 1 thread as at 2 (other reduction
    orders, other round-off)."""
    session.run(PY, "-m", "pytest", "-q", "-m", "not slow and not gpu and not e2e", *session.posargs,
                env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the package, baselines, tests and this file."""
    session.run(PY, "-m", "ruff", "check", "rapm_bench", "baselines", "tests", "noxfile.py")


@nox.session
def slow(session: nox.Session) -> None:
    """Long CPU tests (minutes)."""
    session.run(PY, "-m", "pytest", "-q", "-m", "slow", *session.posargs)


@nox.session
def gpu(session: nox.Session) -> None:
    """Tests that need CUDA (skipped without it)."""
    session.run(PY, "-m", "pytest", "-q", "-m", "gpu", *session.posargs)
