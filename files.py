"""
Files every script writes, written so that nothing is lost: a file is whole or absent (write_atomic), the
temporary names of a killed process are cleaned up only when that process is gone (remove_stale_temporaries),
and a folder that can not be written is found before any work (blocked_parent), not at the first write.
"""
import hashlib
import os
import re
import sys
import tempfile
from contextlib import suppress


def write_atomic(path, content):
    """Write text, bytes, or (a function given the open binary file) under a temporary name, flush it
    to disk, then rename: a crash leaves the old file or the new one, never half of one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:  # a failed write leaves nothing; a Ctrl-C or kill leaves it to remove_stale_temporaries
        with suppress(OSError):
            os.remove(tmp)
        if not isinstance(e, OSError) and isinstance(e.__context__, OSError):  # torch.save's RuntimeError ("unexpected
            raise e.__context__ from None  # pos 704 vs 598") over the write that failed: the disk's own error
        raise


def remove_stale_temporaries(folder, names=None):
    """Remove the temporary files NAME.tmpPID that write_atomic leaves when its process is killed, for the
    processes that no longer run (of `names` only, when given); prints one stderr line for each and returns
    their paths. A file whose process still runs, or may (another user's), is left alone."""
    pattern = re.compile(r"(.+)\.tmp(\d+)")
    removed = []
    try:
        entries = sorted(os.listdir(folder))
    except FileNotFoundError:
        return removed
    for name in entries:
        match = pattern.fullmatch(name)
        path = os.path.join(folder, name)
        if not match or (names is not None and match.group(1) not in names) or os.path.islink(path) \
                or not os.path.isfile(path) or process_is_running(int(match.group(2))):
            continue
        try:
            os.remove(path)
        except FileNotFoundError:  # another process removed it first
            continue
        removed.append(path)
        print(f"removed a leftover temporary file {path} of a process ({match.group(2)}) that no longer runs",
              file=sys.stderr)
    return removed


def process_is_running(pid):
    """Whether a process with this id runs (or may run: when in doubt, yes, so nothing of it is removed)."""
    if os.name == "nt" or pid <= 0:  # on Windows os.kill(pid, 0) would terminate the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: it runs under another user
        return True
    return True


def blocked_parent(path):
    """Why no file can be made at path ("F is a file, not a folder", "F is a link to nothing, not a folder" or "F
    is not writable (Permission denied)", for the nearest existing F above path), or None when it can. Every
    script asks before its work, not at its first write; the file tried leaves no name behind."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is {'a file' if os.path.exists(parent) else 'a link to nothing'}, not a folder"
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        return f"{parent} is not writable ({e.strerror or e})"


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
