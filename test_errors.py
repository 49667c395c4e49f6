"""errors.py: how every script ends on a user's mistake or a disk's error: one line on stderr, exit code 2.

    python -m pytest -q test_errors.py
"""
import errno
import os

import pytest

from errors import UserError, exit_with


def _ended(error, capsys, prefix="x.py: "):
    with pytest.raises(SystemExit) as stop:
        exit_with(error, prefix)
    out, err = capsys.readouterr()
    assert stop.value.code == 2 and out == "" and err.count("\n") == 1, err
    return err.rstrip("\n")


def test_a_user_error_or_a_disk_error_ends_in_one_line_naming_the_file_only_when_there_is_one(capsys):
    assert issubclass(UserError, ValueError)  # the torch-only files raise ValueError: callers catch both alike
    assert _ended(UserError("the record is bad; fix it"), capsys) == "x.py: error: the record is bad; fix it"
    kept = "; what was there before is kept: free space there or make it writable, then run it again"
    full = os.strerror(errno.ENOSPC)
    assert _ended(OSError(errno.ENOSPC, full, "out/a.bin"), capsys) == f"x.py: error: {full} (out/a.bin){kept}"
    assert _ended(OSError(errno.ENOSPC, full), capsys) == f"x.py: error: {full}{kept}"  # no file named: no "(None)"
    assert _ended(OSError("a message of its own"), capsys, "") == f"error: a message of its own{kept}"


def test_a_file_not_found_with_a_sentence_of_its_own_is_printed_as_it_is_without_advice_on_writing(capsys):
    said = "raw/nope.jsonl does not exist; check the path to the task's raw file."  # as tasks.py's loaders raise it
    assert _ended(FileNotFoundError(said), capsys) == f"x.py: error: {said}"
    gone = os.strerror(errno.ENOENT)  # the system's own, from a write into a folder removed meanwhile: still the disk's
    assert _ended(FileNotFoundError(errno.ENOENT, gone, "out/a.bin"), capsys).startswith(
        f"x.py: error: {gone} (out/a.bin); what was there before is kept")
