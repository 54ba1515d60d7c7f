"""The one way imaged runs a program (imaged.tools), against real processes."""

from __future__ import annotations

import pytest

from imaged import tools
from imaged.errors import InternalError, QuotaUnsupportedError, RegistryError


def test_stdout_of_a_success_in_the_c_locale() -> None:
    out = tools.run(["sh", "-c", 'echo "$LC_ALL"'], timeout=10, provides="dash")
    assert out == "C\n"


def test_a_failure_quotes_stderr_on_one_line() -> None:
    with pytest.raises(InternalError, match=r"^sh -c .* failed \(exit 3\): first; second$"):
        tools.run(["sh", "-c", "echo first >&2; echo second >&2; exit 3"], timeout=10,
                  provides="dash")


def test_a_failure_without_stderr_quotes_stdout() -> None:
    with pytest.raises(RegistryError, match=r"failed \(exit 1\): said so$"):
        tools.run(["sh", "-c", "echo said so; exit 1"], timeout=10, provides="dash",
                  error=RegistryError)


def test_exit_statuses_that_count_as_success() -> None:
    assert tools.run(["sh", "-c", "echo fixed; exit 1"], timeout=10, provides="dash",
                     ok=(0, 1)) == "fixed\n"


def test_a_missing_program_names_what_provides_it() -> None:
    with pytest.raises(QuotaUnsupportedError,
                       match=r"^imaged-no-such-tool is not installed: e2fsprogs \(apt"):
        tools.run(["imaged-no-such-tool"], timeout=10, missing=QuotaUnsupportedError,
                  provides="e2fsprogs (apt-get install e2fsprogs)")


def test_a_hung_program_is_stopped_at_its_timeout() -> None:
    with pytest.raises(InternalError, match=r"^sleep 30 did not finish within 0 s$"):
        tools.run(["sleep", "30"], timeout=0.2, provides="coreutils")


def test_completed_hands_back_any_exit_status_and_takes_input() -> None:
    proc = tools.completed(["sh", "-c", "cat; exit 5"], timeout=10, provides="dash",
                           input_text="fed")
    assert (proc.returncode, proc.stdout) == (5, "fed")
