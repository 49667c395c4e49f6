"""The one exception of the project, raised by every file but the torch-only ones (teamlora.py, baselines.py,
model.py and weights.py raise its base class, ValueError) and printed by every script as one sentence; and each
script's entry, run_script."""
import os
import select
import sys
import unicodedata


class UserError(ValueError):
    """A problem the user can fix (a file, a record, a setting): every script of the project prints
    it as one sentence that says what is wrong and what to do, without a traceback."""


def exit_with(error, prefix=""):
    """How a script ends on a UserError, or an OSError of the disk (full, read-only, not ours to write): one line on
    stderr and exit code 2, as argparse ends on a usage error (1 stays a crash's, 3 train.py's out of memory, 130 a
    run stopped by Ctrl-C or SIGTERM)."""
    said = isinstance(error, FileNotFoundError) and error.errno is None  # a reader's sentence (tasks.py: a raw file
    if isinstance(error, OSError) and not said:  # not there), not a disk's; files.write_atomic keeps what it replaces
        where = f" ({error.filename})" if error.filename else ""
        error = (f"{error.strerror or error}{where}; what was there before is kept: free space there or make it "
                 "writable, then run it again")
    print(f"{prefix}error: {printable(str(error))}", file=sys.stderr)
    sys.exit(2)


def printable(text, keep="\t"):
    """text with its control characters but those in `keep` escaped as repr shows them: a message stays the one line
    it promises where it quotes a value with a line break (a path, a flag's value), and a terminal shows, instead of
    obeying, the escape sequences of what was read from a file (a colour, a clipboard write)."""
    return "".join(repr(c)[1:-1] if c not in keep and unicodedata.category(c) == "Cc" else c for c in text)


def run_script(main):
    """A script's entry: main(), ended quietly when the reader of its output has gone (`python train.py --help | head
    -3`) rather than with a BrokenPipeError's traceback; exit code 1, as Python's documentation does it."""
    flush = lambda: sys.stdout and sys.stdout.flush()  # None: started with no stdout (>&-)
    try:
        try:
            main()
        except SystemExit:  # argparse's --help ends so, its text still in stdout's buffer
            flush()
            raise
        flush()  # here, not in the interpreter's flush at exit, which would print its BrokenPipeError
    except BrokenPipeError:
        if not hasattr(select, "poll"):  # Windows: the traceback stays
            raise
        stdout = select.poll()
        stdout.register(1, select.POLLOUT)
        if not any(event & select.POLLERR for _, event in stdout.poll(0)):  # POLLERR: no reader left on that pipe
            raise  # another pipe's (a process's of ours, say): a fault to show
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # else the interpreter's flush at exit meets the pipe again
        sys.exit(1)
