"""The one exception of the project, raised by every file but the ones that import no errors.py (teamlora.py,
baselines.py, model.py, weights.py and memory.py raise its base class, ValueError; bench.py refuses through Parser)
and printed by every script as one sentence; each script's entry, run_script (and start_script, which each script
calls before its imports, ctrl_c_held, for the processes a script starts, and output_lost, its end where stdout
cannot be written, which machine.leave shares); and Parser, the argparse of the scripts with flags (train.py and
study.py read theirs with configurator.py)."""
import argparse
import ast
import contextlib
import difflib
import errno
import os
import select
import signal
import sys
import unicodedata

if sys.version_info < (3, 9):  # every script imports this file first: an older Python would fail later, in a traceback
    print(f"error: this project needs Python 3.9 or newer (as torch 2.6 does), not {sys.version.split()[0]}; run it "
          "with a newer python", file=sys.stderr)
    sys.exit(2)


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


def listed(names, most=3):
    """names for a sentence: the first `most`, then how many more."""
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def at_a_terminal():
    """Whether stderr, where the progress bars go, is a terminal: not a log file, nor a pipe, nor closed (`2>&-`, where
    Python's sys.stderr is None and a tqdm left to decide would write to it)."""
    return sys.stderr is not None and sys.stderr.isatty()


def docstring(path):
    """The docstring of the script at path, stripped, read from its file: a script's --help prints it, and `python -OO`
    (which strips docstrings) leaves its __doc__ None."""
    with open(path, encoding="utf-8") as f:
        return ast.get_docstring(ast.parse(f.read()), clean=False).strip()


class Parser(argparse.ArgumentParser):
    """argparse read as train.py reads its flags: whole names only (an abbreviation, --temp for --temperature, would
    change its meaning or fail when a flag is added), a switch also as --overwrite=True or --overwrite=False, and a
    flag that is not one named with its closest (--instrucion: --instruction)."""

    def __init__(self, **kwargs):
        super().__init__(**{"allow_abbrev": False, **kwargs})  # add_subparsers makes its parsers of this class too

    def _print_message(self, message, file=None):  # argparse's passes over a write that fails: --help > /dev/full
        if message:  # printed nothing, with exit code 0; run_script names a full disk
            (file or sys.stderr).write(message)

    def flags(self):
        """{option string: action} of this parser and of its subcommands' parsers."""
        found = {}
        for action in self._actions:
            found.update(dict.fromkeys(action.option_strings, action))
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    found.update(sub.flags())
        return found

    def parse_args(self, args=None, namespace=None):
        flags, given = self.flags(), []
        args = sys.argv[1:] if args is None else list(args)
        for n, arg in enumerate(args):
            name, eq, value = arg.partition("=")
            action = flags.get(name)
            if arg == "--":  # what follows are values
                given += args[n:]
                break
            if arg.startswith("--") and action is None and " " not in arg:  # with a space, argparse takes it as a value
                names = [f for f in flags if f.startswith("--")]
                close = [f for f in names if f.startswith(name)]  # an abbreviation: its flag, if only one
                if len(close) != 1:  # the closest by name, without the "--" every flag shares (as configurator.py
                    bare = {f[2:]: f for f in names}  # compares config keys): with it, --pr was 60% like --help
                    close = [f for f in names if f.lower() == name.lower()] or \
                        [bare[b] for b in difflib.get_close_matches(name[2:], bare, n=1)]  # --TOP_P: none, by case
                self.error(f"{name} is not a flag of this script; " +
                           (f"did you mean {close[0]}?" if close else "--help lists them"))
            if eq and action is not None and action.nargs == 0 and isinstance(action.default, bool):  # a switch
                if value not in ("True", "False"):
                    self.error(f"{name} is a switch: give it alone, or as {name}=True or {name}=False, not {arg}")
                on = (value == "True") != name.startswith("--no-")  # --no-tf32=False is --tf32
                if isinstance(action, argparse.BooleanOptionalAction):
                    given.append(action.option_strings[0 if on else 1])
                elif on:
                    given.append(name)
                else:  # off: as if never given, the last of several winning as in train.py
                    given = [a for a in given if a != name]
                continue
            given.append(arg)
        return super().parse_args(given, namespace)


def start_script():
    """For a script run as one, before its imports. A standard stream the shell closed (`2>&-`) is opened on
    os.devnull, and the script runs as with `2>/dev/null`: else the next file opened (a .lock, a checkpoint's
    temporary) takes its number, and what torch's C++ code writes to stderr goes into that file; and Python leaves
    sys.stderr (sys.stdout, sys.stdin) None, whose flush fails (machine.leave's under torchrun, bench.py's), and
    print(..., file=sys.stderr) then writes to stdout. And a Ctrl-C while torch imports (a second or more, before
    run_script can take it) ends the script as run_script ends it, by SIGINT without a traceback: Python itself still
    ends so after one, and its hook, which would print the traceback, prints none for it."""
    for fd, name in enumerate(("stdin", "stdout", "stderr")):
        try:
            os.fstat(fd)
        except OSError:  # closed: the lowest free number is fd's, the ones below it are open by now
            os.dup2(null := os.open(os.devnull, os.O_RDWR), fd)
            if null != fd:
                os.close(null)
        if getattr(sys, name) is None:  # closed when Python started: a stream that takes any text, read by nobody
            stream = open(fd, "w" if fd else "r", encoding="utf-8", errors="backslashreplace" if fd else None,
                          closefd=False)
            setattr(sys, name, stream)
            setattr(sys, f"__{name}__", stream)
    try:
        os.getcwd()
    except FileNotFoundError:  # removed (rm -rf, a checkout made again): torch's import aborted the process ("Intel
        # oneMKL FATAL ERROR"), and the first relative path failed as a full disk does, with advice to free space
        print(f"{os.path.basename(sys.argv[0])}: error: the current folder was removed after the shell entered it (a "
              'folder made again under its name is another one); cd into one that exists (cd "$PWD"), then run it '
              "again", file=sys.stderr)
        sys.exit(2)
    shown = sys.excepthook
    sys.excepthook = lambda kind, value, tb: None if issubclass(kind, KeyboardInterrupt) else shown(kind, value, tb)


@contextlib.contextmanager
def ctrl_c_held():
    """For the duration, this thread holds a Ctrl-C back (its SIGINT blocked: it arrives as the block ends, and is not
    lost), and a process started meanwhile inherits the block for good. So data.py's prepare starts its workers: one
    that a Ctrl-C reached while it imported (a second or more, before it can ignore SIGINT) printed a
    KeyboardInterrupt's traceback under prepare's quiet end. CPython starts its resource tracker so (bpo-33613)."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        yield
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def run_script(main):
    """A script's entry: main(), ended quietly when the reader of its output has gone (`python train.py --help | head
    -3`) rather than with a BrokenPipeError's traceback; exit code 1, as Python's documentation does it. Ctrl-C where
    main does not take it (train.py takes it in its loop and its scoring) ends the script without a traceback, by
    SIGINT as Python ends, so that a shell loop running it stops too. Output to a full disk is one sentence (exit code
    2), as exit_with ends."""
    flush = lambda: sys.stdout and sys.stdout.flush()  # None: no stdout (>&-) and no start_script
    if hasattr(sys.stdout, "reconfigure"):  # a stdout not in UTF-8 (PYTHONIOENCODING=ascii, a Windows file): the
        sys.stdout.reconfigure(errors="backslashreplace")  # table's bars and ± as escapes, not a traceback
    try:
        try:
            main()
        except SystemExit:  # argparse's --help ends so, its text still in stdout's buffer
            flush()
            raise
        flush()  # here, not in the interpreter's flush at exit, which would print its BrokenPipeError
    except KeyboardInterrupt:
        if not hasattr(signal, "SIGKILL"):  # Windows: the traceback stays
            raise
        with contextlib.suppress(OSError):  # what main printed stays printed (a reader gone: nothing to keep)
            flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except OSError as e:  # stdout's reader gone, or its disk full; any other fault shows its traceback
        if (code := output_lost(e)) is None:
            raise
        sys.exit(code)


def output_lost(error):
    """The exit code of a script whose write to stdout raised `error`, as run_script ends it (and machine.leave under
    torchrun): 1, quiet, where the reader of its output has gone (`| head -3`), as Python's documentation does it; 2,
    with one sentence, where its disk is full (`> log`, /dev/full), as exit_with ends. Stdout is os.devnull then: what
    it still holds is lost, not met again in the interpreter's flush at exit. None for another fault, to show."""
    if isinstance(error, BrokenPipeError):
        if not hasattr(select, "poll"):  # Windows: the traceback stays
            return None
        stdout = select.poll()
        stdout.register(1, select.POLLOUT)
        if not any(event & select.POLLERR for _, event in stdout.poll(0)):  # POLLERR: no reader left on that pipe
            return None  # another pipe's (a process's of ours, say): a fault to show
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # else the interpreter's flush at exit meets the pipe again
        return 1
    if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or error.filename is not None:
        return None  # main names any file of its own it cannot write
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    try:
        print(f"error: the output could not be written ({error.strerror}); free space where it goes, or send it "
              "elsewhere, then run it again", file=sys.stderr)
    except OSError:  # stderr's disk is full too (`> log 2>&1`): the exit code alone says it, not a traceback at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    return 2
