"""errors.py: how every script ends on a user's mistake or a disk's error: one line on stderr, exit code 2.

    python -m pytest -q test_errors.py
"""
import argparse
import contextlib
import difflib
import errno
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import repository_files
from errors import Parser, UserError, at_a_terminal, ctrl_c_held, exit_with, printable, run_script, start_script


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


def test_a_message_quoting_a_value_with_a_line_break_stays_one_line(capsys):
    """A path or flag value with a newline or carriage return in it was echoed raw: the one-line error spanned lines
    (a log reader's or a wrapper script's first line then held half of it)."""
    assert _ended(UserError("init_from 'a\nb\r' does not exist; fix it"), capsys) == \
        "x.py: error: init_from 'a\\nb\\r' does not exist; fix it"
    # a raw file's label, quoted: a terminal shows its escape sequence instead of obeying it; text and tabs stay
    assert _ended(UserError("has the label '\x1b[2J\x9b\tcaf\u00e9'"), capsys) == \
        "x.py: error: has the label '\\x1b[2J\\x9b\tcaf\u00e9'"
    assert printable("a\x1bb\n\t", keep="\n\t") == "a\\x1bb\n\t"


def test_a_file_not_found_with_a_sentence_of_its_own_is_printed_as_it_is_without_advice_on_writing(capsys):
    said = "raw/nope.jsonl does not exist; check the path to the task's raw file."  # as tasks.py's loaders raise it
    assert _ended(FileNotFoundError(said), capsys) == f"x.py: error: {said}"
    gone = os.strerror(errno.ENOENT)  # the system's own, from a write into a folder removed meanwhile: still the disk's
    assert _ended(FileNotFoundError(errno.ENOENT, gone, "out/a.bin"), capsys).startswith(
        f"x.py: error: {gone} (out/a.bin); what was there before is kept")


def test_a_script_ends_as_its_main_does_where_its_output_is_read(capsys):
    """run_script flushes what main printed before main's own end (exit_with's code 2 here) goes on as it was."""
    def main():
        print("kept")
        exit_with(UserError("the record is bad; fix it"))

    with pytest.raises(SystemExit) as stop:
        run_script(main)
    assert stop.value.code == 2 and capsys.readouterr() == ("kept\n", "error: the record is bad; fix it\n")
    assert run_script(lambda: print("done")) is None and capsys.readouterr().out == "done\n"


REPO = Path(__file__).resolve().parent


def _with_its_reader_gone(argv, buffered=True, cwd=REPO):
    """(exit code, stderr) of a command whose stdout is a pipe that nobody reads any more, as after `| head -1`;
    buffered: as Python writes to a pipe unless PYTHONUNBUFFERED is set (as it may be where the tests run)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | ({} if buffered else
                                                                              {"PYTHONUNBUFFERED": "1"})
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, *argv], stdout=write_end, stderr=subprocess.PIPE, text=True, cwd=cwd,
                              env=env, timeout=300)
    finally:
        os.close(write_end)
    return done.returncode, done.stderr


@pytest.mark.skipif(not hasattr(__import__("select"), "poll"), reason="Windows has no poll: the traceback stays")
@pytest.mark.parametrize("argv", [["train.py", "--help"], ["study.py", "--help"], ["train.py", "--dry_run=True"],
                                  ["sample.py", "--help"], ["data.py", "prepare", "--help"], ["tasks.py", "--help"],
                                  ["minicme.py", "--help"], ["bench.py", "--help"]], ids=" ".join)
def test_a_script_whose_output_is_no_longer_read_ends_without_a_traceback(argv, tmp_path):
    """`python train.py --help | head -3` printed a BrokenPipeError's traceback under the lines wanted; and with
    stdout buffered, as it is, what was left in the buffer met the pipe in the interpreter's flush at exit, which
    printed 'Exception ignored ... BrokenPipeError' and ended with code 120."""
    cwd = REPO
    if argv[1:] == ["--dry_run=True"]:  # the demo's, from a folder of its own as from a fresh clone: in the repository
        argv, cwd = [str(REPO / argv[0]), *argv[1:]], tmp_path  # out/demo holds a run once the demo has run (refused)
    code, err = _with_its_reader_gone(argv, cwd=cwd)
    assert err == "" and code == 1, err
    if argv[1] == "--dry_run=True":  # unbuffered, each print meets the pipe in main
        code, err = _with_its_reader_gone(argv, buffered=False, cwd=cwd)
        assert err == "" and code == 1, err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full (Linux has one) to stand for a full disk")
@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize("argv", [["train.py", "--help"], ["study.py", "--help"], ["sample.py", "--help"],
                                  ["data.py", "prepare", "--help"], ["tasks.py", "--help"]], ids=" ".join)
def test_output_to_a_full_disk_is_one_sentence_not_a_traceback_or_silence(argv, buffered):
    """`python train.py --help > log` on a full disk ended in a traceback, and argparse's scripts printed nothing
    with exit code 0 (argparse passes over a failed write)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | ({} if buffered else
                                                                              {"PYTHONUNBUFFERED": "1"})
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, *argv], stdout=full, stderr=subprocess.PIPE, text=True, cwd=REPO,
                              env=env, timeout=300)
    assert done.returncode == 2 and done.stderr == ("error: the output could not be written (No space left on "
                                                    "device); free space where it goes, or send it elsewhere, then "
                                                    "run it again\n"), done.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full (Linux has one) to stand for a full disk")
def test_output_and_errors_both_to_a_full_disk_still_end_with_a_full_disks_code():
    """`python tasks.py --help > log 2>&1` on a full disk: the sentence meant for stderr failed too, and the script
    ended in the interpreter's failed flush of stderr at exit, code 120. Nothing can be said there: exit code 2 says
    it, as where only stdout's disk is full."""
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "tasks.py", "--help"], stdout=full, stderr=full, cwd=REPO, timeout=300)
    assert done.returncode == 2


@pytest.mark.skipif(os.name != "posix", reason="a POSIX shell's ulimit and a disk quota's errno")
def test_output_past_the_largest_file_allowed_or_a_disk_quota_is_the_same_one_sentence(tmp_path):
    """`ulimit -f` (EFBIG) and a user's disk quota (EDQUOT) stop stdout's writes as a full disk does, and must end
    the same way: one sentence with exit code 2, not a traceback."""
    done = subprocess.run(["sh", "-c", 'ulimit -f 0 && exec "$0" tasks.py --help > "$1"', sys.executable,
                           str(tmp_path / "log")], stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=300)
    said = "error: the output could not be written ({}); free space where it goes, or send it elsewhere, then run " \
           "it again\n"
    assert done.returncode == 2 and done.stderr == said.format(os.strerror(errno.EFBIG)), done.stderr
    code = ("import errno, os, errors\ndef main():\n    raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))\n"
            "errors.run_script(main)\n")  # as a write to stdout raises it: no file named
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 2 and done.stderr == said.format(os.strerror(errno.EDQUOT)), done.stderr


def test_output_to_a_stream_that_is_not_utf8_is_escaped_not_a_traceback():
    """study.py --help (its ±) and a run's score table (its bars) ended in a UnicodeEncodeError where stdout's
    encoding is ASCII (PYTHONIOENCODING=ascii; a file on Windows is in its ANSI code page)."""
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    done = subprocess.run([sys.executable, "study.py", "--help"], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=300)
    assert done.returncode == 0 and done.stderr == "" and "\\xb1" in done.stdout, done.stderr
    # the bars as escapes in the code: argv is in the locale's encoding, which may be ASCII as well (LC_ALL=C)
    code = "import errors\nerrors.run_script(lambda: print('load \\u2588\\u2588 35%'))\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "load \\u2588\\u2588 35%\n", "")


def test_a_full_disk_for_a_file_of_mains_own_is_still_its_traceback():
    """Only stdout's failure is named so: an error naming a file of main's own (which its handlers missed) stays a
    fault to see."""
    code = ("import errno, errors\ndef main():\n    raise OSError(errno.ENOSPC, 'No space left on device', 'a.bin')\n"
            "errors.run_script(main)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 1 and "Traceback" in done.stderr and "a.bin" in done.stderr, done.stderr


@pytest.mark.skipif(os.name != "posix", reason="Windows has no SIGKILL: the traceback stays")
def test_ctrl_c_where_main_does_not_take_it_ends_the_script_by_sigint_without_a_traceback_keeping_its_output():
    """A KeyboardInterrupt printed its traceback (sample.py while it answers, data.py prepare, train.py before its
    loop); the script now ends as Python does after one, killed by SIGINT, which a shell loop reads as a reason to
    stop (bash, when the terminal's Ctrl-C reached it too), and what main printed to a buffered stdout is still
    written."""
    code = "import errors\ndef main():\n    print('answered')\n    raise KeyboardInterrupt\nerrors.run_script(main)\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60, env=env)
    assert (done.returncode, done.stdout, done.stderr) == (-signal.SIGINT, "answered\n", "")


SCRIPTS = ("bench.py", "data.py", "minicme.py", "sample.py", "study.py", "tasks.py", "train.py")


def test_every_script_is_among_those_whose_ctrl_c_while_importing_is_tested():
    scripts = {p.name for p in repository_files("*.py") if "\n    run_script(main)\n" in p.read_text(encoding="utf-8")}
    assert scripts == set(SCRIPTS)


@pytest.mark.skipif(os.name != "posix", reason="kill with SIGINT, as a terminal's Ctrl-C")
@pytest.mark.parametrize("script", SCRIPTS)
def test_ctrl_c_while_a_script_imports_torch_ends_it_by_sigint_without_a_traceback(tmp_path, script):
    """The first second or more of `python train.py` is torch's import, before run_script, which ends a script on
    Ctrl-C quietly, has started: a Ctrl-C there printed a KeyboardInterrupt's traceback. A torch and a numpy ahead of
    the real ones on the path are sent SIGINT while the first of them is imported."""
    for name in ("torch", "numpy"):
        (tmp_path / f"{name}.py").write_text("import os\nimport signal\nimport time\n\n"
                                             "os.kill(os.getpid(), signal.SIGINT)\ntime.sleep(60)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=REPO, timeout=60,
                          env=env)
    assert (done.returncode, done.stdout, done.stderr) == (-signal.SIGINT, "", "")


@pytest.mark.skipif(os.name != "posix", reason="file descriptors closed before the program starts, as `2>&-` does")
@pytest.mark.parametrize("closed", [(2,), (1,), (0, 1, 2)])
def test_a_stream_the_shell_closed_is_not_the_number_of_the_next_file_opened(tmp_path, closed):
    """`python train.py 2>&-`: the next file opened took the number 2, and what torch's C++ code writes to stderr went
    into it (a .lock, a checkpoint's temporary). start_script opens os.devnull in the closed streams' place."""
    code = ("import os\nimport errors\nerrors.start_script()\n"
            f"f = open({str(tmp_path / 'ckpt.pt.tmp')!r}, 'wb')\n"
            "for fd in (1, 2):\n    os.write(fd, b'a warning from C++ code\\n')\n"
            "f.write(b'the checkpoint')\nf.close()\nprint('printed')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60, capture_output=True,
                          preexec_fn=lambda: [os.close(fd) for fd in closed])
    assert done.returncode == 0 and (tmp_path / "ckpt.pt.tmp").read_bytes() == b"the checkpoint"
    assert (b"printed" in done.stdout) == (1 not in closed)


@pytest.mark.skipif(os.name != "posix", reason="a current folder removed while a shell is in it")
@pytest.mark.parametrize("script", ["train.py", "data.py", "tasks.py"])
def test_a_current_folder_removed_since_the_shell_entered_it_is_one_sentence(tmp_path, script):
    """`rm -rf run && mkdir run` in another terminal, then the script in the first: torch's import aborted the process
    ("Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so"), and data.py's and tasks.py's first relative path failed
    with advice to free space. --help: a script that reached its own work would print it and end with code 0."""
    gone = tmp_path / "run"
    gone.mkdir()
    done = subprocess.run(["bash", "-c", 'cd "$1" && rmdir "$1" && exec "$2" "$3" --help', "-", str(gone),
                           sys.executable, str(REPO / script)], timeout=120, capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (2, ""), done
    assert done.stderr == (f"{script}: error: the current folder was removed after the shell entered it (a folder made "
                           'again under its name is another one); cd into one that exists (cd "$PWD"), then run it '
                           "again\n")


def test_start_script_hides_a_keyboard_interrupts_traceback_alone_and_passes_any_other_to_the_hook_it_replaced(
        monkeypatch):
    """Only a KeyboardInterrupt (or a kind of one) goes unprinted: any other error that nothing catches while a script
    imports still reaches the hook that was there, with its traceback, as Python would print it."""
    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda kind, value, tb: seen.append((kind, value, tb)))
    start_script()
    kinds = (KeyboardInterrupt, type("Stop", (KeyboardInterrupt,), {}), ImportError, SystemExit, ValueError)
    raised = [(kind, kind("x"), object()) for kind in kinds]
    for error in raised:
        assert sys.excepthook(*error) is None
    assert seen == raised[2:]


@pytest.mark.skipif(os.name != "posix", reason="Windows has no SIGKILL: the traceback stays")
def test_ctrl_c_once_stdouts_reader_has_gone_still_ends_the_script_by_sigint_without_a_traceback():
    """`python sample.py ... | head -1`, then Ctrl-C: what main printed can no longer reach the reader, and the flush
    that tries must not print a BrokenPipeError's traceback instead of ending as Ctrl-C does."""
    code = "import errors\ndef main():\n    print('answered')\n    raise KeyboardInterrupt\nerrors.run_script(main)\n"
    assert _with_its_reader_gone(["-c", code]) == (-signal.SIGINT, "")


def test_a_broken_pipe_that_is_not_stdouts_still_shows_its_traceback():
    """Only stdout's reader going is quiet: a pipe of another process's that breaks is a fault to see."""
    code = ("import errors\ndef main():\n    print('before')\n    raise BrokenPipeError(32, 'a worker pipe')\n"
            "errors.run_script(main)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 1 and done.stdout == "before\n" and "BrokenPipeError: [Errno 32] a worker pipe" in \
        done.stderr


def test_a_broken_pipe_where_there_is_no_poll_to_ask_whose_pipe_it_was_is_a_fault_to_show(monkeypatch):
    """Windows has no select.poll: output_lost cannot tell stdout's reader going from another pipe's breaking, so the
    BrokenPipeError stays a traceback (None), not an AttributeError raised while run_script handles it."""
    import errors
    monkeypatch.delattr("select.poll")
    assert errors.output_lost(BrokenPipeError(errno.EPIPE, "Broken pipe")) is None


def test_another_fault_while_stdouts_reader_is_gone_still_shows_its_traceback():
    """Only a BrokenPipeError is the reader's going: a file not found meanwhile is a fault to see, reader or not."""
    code = "import errors\ndef main():\n    raise FileNotFoundError(2, 'a shard')\nerrors.run_script(main)\n"
    status, err = _with_its_reader_gone(["-c", code])
    assert status == 1 and "FileNotFoundError: [Errno 2] a shard" in err, err


def test_a_broken_pipe_while_stdouts_pipe_is_full_shows_its_traceback_without_waiting_for_room():
    """A reader slow to read is still there: the question whether it has gone must not wait until it reads."""
    code = ("import errors, os\ndef main():\n    os.set_blocking(1, False)\n    try:\n        while True:\n"
            "            os.write(1, bytes(4096))\n    except BlockingIOError:\n        pass\n"
            "    raise BrokenPipeError(32, 'a worker pipe')\nerrors.run_script(main)\n")
    read_end, write_end = os.pipe()
    try:
        done = subprocess.run([sys.executable, "-c", code], stdout=write_end, stderr=subprocess.PIPE, text=True,
                              cwd=REPO, timeout=60)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert done.returncode == 1 and "BrokenPipeError: [Errno 32] a worker pipe" in done.stderr, done.stderr


@pytest.mark.skipif(os.name != "posix", reason="a POSIX shell closes a stream")
@pytest.mark.parametrize("closed, sent", [(">&-", ">/dev/null"), ("2>&-", "2>/dev/null"), ("<&-", "</dev/null")])
@pytest.mark.parametrize("argv", [["--help"], ["--task=imdb", "--raw=nowhere/aclImdb", "--out=x.jsonl"]])
def test_a_script_started_with_a_stream_closed_runs_as_with_that_stream_sent_to_dev_null(closed, sent, argv):
    """`python tasks.py --help >&-` printed its help on stderr, and `2>&-` printed an error on stdout: Python leaves
    a stream closed at its start None, and argparse and print(..., file=sys.stderr) write to the other one then."""
    def run(redirect):
        return subprocess.run(["sh", "-c", f'exec "$0" tasks.py "$@" {redirect}', sys.executable, *argv],
                              capture_output=True, text=True, cwd=REPO, timeout=300)
    done, want = run(closed), run(sent)
    assert (done.returncode, done.stdout, done.stderr) == (want.returncode, want.stdout, want.stderr)
    assert done.returncode == (0 if argv == ["--help"] else 2) and "Traceback" not in done.stderr, done.stderr


@pytest.mark.skipif(os.name != "posix", reason="file descriptors closed before the program starts, as `2>&-` does")
@pytest.mark.parametrize("closed", [(0,), (1,), (2,), (0, 1, 2)])
def test_start_script_gives_a_stream_the_shell_closed_a_text_stream_on_os_devnull(closed):
    """Python leaves sys.stdin, sys.stdout or sys.stderr None for a stream closed at its start: a flush of it failed
    (machine.leave's under torchrun, bench.py's before its profiler) and print(..., file=sys.stderr) wrote to stdout.
    Each is a stream on its own file descriptor, reading nothing and writing where nobody reads."""
    code = ("import os, sys\nimport errors\nerrors.start_script()\n"
            "streams = (sys.stdin, sys.stdout, sys.stderr)\n"
            "assert [s.fileno() for s in streams] == [0, 1, 2]\n"
            "assert (sys.__stdin__, sys.__stdout__, sys.__stderr__) == streams\n"
            "for fd in (0, 1, 2):\n    os.fstat(fd)\n"
            "print('to stderr', file=sys.stderr, flush=True)\nprint('to stdout', flush=True)\n"
            "sys.stdout.flush()\nsys.stderr.flush()\nprint(repr(sys.stdin.read()), file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, preexec_fn=lambda: [os.close(fd) for fd in closed])
    assert done.returncode == 0, done.stderr
    assert done.stdout == ("" if 1 in closed else "to stdout\n")
    assert done.stderr == ("" if 2 in closed else "to stderr\n''\n")


@pytest.mark.skipif(os.name != "posix", reason="file descriptors closed before the program starts, as `2>&-` does")
@pytest.mark.parametrize("closed", [1, 2])
def test_a_stream_the_shell_closed_takes_any_text_as_the_stream_it_stands_for_does(closed):
    """What a script writes to a stream nobody reads is never its fault: a file name of bytes that are not UTF-8 (a
    lone surrogate to Python), which sys.stderr escapes, is no UnicodeEncodeError on the stream start_script opens."""
    stream = "sys.stdout" if closed == 1 else "sys.stderr"
    code = f"import sys\nimport errors\nerrors.start_script()\nprint('a name \\udcff', file={stream}, flush=True)\n"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, preexec_fn=lambda: os.close(closed))
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="Windows has no signal mask")
def test_a_ctrl_c_held_arrives_as_the_hold_ends_and_a_process_started_meanwhile_holds_it_for_good():
    """ctrl_c_held, as data.py's prepare starts its workers: the Ctrl-C (to this thread: others may take a process's
    signal) is neither lost nor taken inside, and the process started there never takes one."""
    held = "import signal\nprint(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))\n"
    done, before = [], signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with pytest.raises(KeyboardInterrupt):
        with ctrl_c_held():
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)
            done.append(subprocess.run([sys.executable, "-c", held], capture_output=True, text=True, timeout=60))
    assert [d.stdout for d in done] == ["True\n"]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before and signal.SIGINT not in before


def _parser():
    parser = Parser(prog="x.py")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--text", default="")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True)
    return parser


def _refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2, err
    return err[-1]


def test_a_switch_is_also_given_as_train_py_gives_it_true_or_false_the_last_one_winning(capsys):
    """--overwrite=True / --tf32=False, as train.py takes them, were argparse's "ignored explicit argument"."""
    parse = lambda *argv: vars(_parser().parse_args(list(argv)))
    assert parse("--overwrite=True") == parse("--overwrite") != parse()
    assert parse("--overwrite=False") == parse("--overwrite", "--overwrite=False") == parse()
    assert parse("--tf32=False") == parse("--no-tf32") == parse("--no-tf32=True") != parse()
    assert parse("--no-tf32", "--tf32=True") == parse("--no-tf32=False") == parse()
    assert parse("--text", "--what is it?")["text"] == "--what is it?"  # with a space: a value, not a flag
    assert _refused(["--overwrite=yes"], capsys) == ("x.py: error: --overwrite is a switch: give it alone, or as "
                                                     "--overwrite=True or --overwrite=False, not --overwrite=yes")


def test_a_flag_is_taken_by_its_whole_name_only_and_one_that_is_not_a_flag_is_named_with_its_closest(capsys):
    """An abbreviation was taken as its flag (--temp: --temperature) until a flag added later made it ambiguous or
    another's; a misspelt flag, in a subcommand too, was an "unrecognized argument" with no hint."""
    assert _refused(["--temp=1"], capsys) == "x.py: error: --temp is not a flag of this script; did you mean " \
        "--temperature?"
    assert _refused(["--overwirte"], capsys).endswith("did you mean --overwrite?")
    assert _refused(["--zzz=1"], capsys) == "x.py: error: --zzz is not a flag of this script; --help lists them"
    parser = Parser(prog="d.py")
    parser.add_subparsers(dest="command", required=True).add_parser("prepare").add_argument("--max_len", type=int)
    assert vars(parser.parse_args(["prepare", "--max_len=8"])) == {"command": "prepare", "max_len": 8}
    for argv in (["prepare", "--max=8"], ["prepare", "--maxlen=8"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        assert capsys.readouterr().err.strip().splitlines()[-1].endswith("did you mean --max_len?")


@pytest.mark.parametrize("typo, meant", [("--TEMPERATURE", "--temperature"), ("--TF32", "--tf32"),
                                         ("--OVERWRITE", "--overwrite")])
def test_a_flag_given_in_another_case_is_suggested_as_its_flag(capsys, typo, meant):
    """difflib's similarity counts T and t as unlike: --TEMPERATURE=1 or --TF32=1 was "--help lists them"."""
    assert _refused([f"{typo}=1"], capsys) == f"x.py: error: {typo} is not a flag of this script; did you mean {meant}?"


@pytest.mark.parametrize("typo, meant", [("--tempr", "--temperature"), ("--owrt", "--overwrite"),
                                         ("--tamper", None), ("--owrts", None), ("--force", None), ("--pr", None),
                                         ("--tp", None)])
def test_a_flag_at_least_60_percent_like_the_one_given_is_suggested_and_a_less_like_one_is_not(capsys, typo, meant):
    """difflib's similarity (twice the characters in common over both lengths) of the names without the "--" every
    flag shares, as configurator.py compares config keys: tempr is 0.625 like temperature, owrt 0.615 like overwrite;
    tamper (0.588), owrts (0.571) and force (0.429) are too far to be what was meant, and --help lists the flags
    instead. With the dashes counted, --pr was 0.6 like --help and --tp like --tf32, and both were suggested."""
    flags = [flag for flag in _parser().flags() if flag.startswith("--")]
    similarity = max(difflib.SequenceMatcher(None, typo[2:], flag[2:]).ratio() for flag in flags)
    assert (similarity >= 0.6) == (meant is not None)  # what the cases were chosen for
    hint = f"did you mean {meant}?" if meant else "--help lists them"
    assert _refused([f"{typo}=1"], capsys) == f"x.py: error: {typo} is not a flag of this script; {hint}"


def test_a_switch_takes_only_true_or_false_and_a_negative_number_or_spaced_abbreviation_is_read_as_argparse_would(
        capsys):
    """--overwrite=1 is not a switch's True; "-1" after a flag is its value, not an unknown flag; an abbreviation
    whose value holds a space (left to argparse) is refused there too, not taken as its flag; of several flags an
    abbreviation begins, the closest is named."""
    for value in ("1", "0", "true"):
        assert _refused([f"--overwrite={value}"], capsys).endswith(f"not --overwrite={value}")
    assert _parser().parse_args(["--temperature", "-1"]).temperature == -1.0
    assert "unrecognized arguments: --temp=a b" in _refused(["--temp=a b"], capsys)
    assert _refused(["--te=1"], capsys).endswith("did you mean --text?")  # --temperature and --text begin with it


def test_after_a_double_dash_every_argument_is_a_value_even_one_that_looks_like_a_flag():
    """`--` ends the flags, as in argparse: a value that begins with -- (a prompt, a file so named) follows it, and
    must reach the script as it is, not be refused as a misspelt flag or a switch's wrong value."""
    parser = _parser()
    parser.add_argument("words", nargs="*")
    parsed = parser.parse_args(["--overwrite", "--", "--temp=1", "--overwrite=yes"])
    assert parsed.overwrite and parsed.words == ["--temp=1", "--overwrite=yes"]


def test_help_given_a_value_is_refused_not_read_as_a_switch_turned_off(capsys):
    """--help is no switch: --help=False must not quietly run the script (a sampling, a data preparation) as if no
    flag were given."""
    assert "ignored explicit argument 'False'" in _refused(["--help=False"], capsys)


@pytest.mark.parametrize("script", ["train", "study", "sample"])
def test_help_is_the_same_under_python_OO_which_strips_the_docstrings_it_prints(script, monkeypatch, capsys):
    """`python -OO train.py --help` (study.py's, sample.py's) ended in a traceback: -OO leaves a module's __doc__ None,
    and --help printed __doc__.strip(); sample.py's lost its introduction. Here __doc__ is None, as -OO leaves it."""
    module = __import__(script)

    def help_text():
        with contextlib.nullcontext() if script == "study" else pytest.raises(SystemExit):
            module.main(["--help"])
        return capsys.readouterr().out
    whole = help_text()
    assert module.__doc__.strip().splitlines()[0] in whole
    monkeypatch.setattr(module, "__doc__", None)
    assert help_text() == whole


def test_at_a_terminal_is_true_for_a_terminal_only_not_for_a_file_nor_for_a_closed_stderr(tmp_path, monkeypatch):
    """Where train.py and data.py show a progress bar: a terminal, not a log file; and with stderr closed (`2>&-`,
    sys.stderr None) neither shows one, nor fails."""
    ours, theirs = os.openpty()
    with open(theirs, "w") as terminal, open(tmp_path / "log", "w") as log:
        for stream, want in ((terminal, True), (log, False), (None, False)):
            monkeypatch.setattr(sys, "stderr", stream)
            assert at_a_terminal() is want
    os.close(ours)
