"""The one exception of the project, raised by every file but the torch-only ones (teamlora.py, baselines.py,
model.py and weights.py raise its base class, ValueError) and printed by every script as one sentence."""
import sys


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
    print(f"{prefix}error: {error}", file=sys.stderr)
    sys.exit(2)
