"""
Files every script writes, written so that nothing is lost: a file is whole or absent (write_atomic), the temporary
names of a killed process are cleaned up only when that process is gone (remove_stale_temporaries), a folder that can
not be written is found before any work (blocked_parent), not at the first write, a folder that one process writes is
refused to a second one while the first runs (hold; held_by names the first without holding the folder; lost tells the
first that its lock file was deleted), a named pipe or a device given as a file to read is named (special_file) instead
of read forever, a set of files goes into a folder with the one that says the set is complete last, once the others are
on disk (move_into), a file a script writes again at each run (a report) replaces only the one it wrote, never a user's
own or one edited since (write_own, kept), and every script reads a JSON file one way (read_json): whatever is wrong
with it is one sentence naming the file and the fix. A run's paths are checked before it starts: a name torch can not
open, not being UTF-8 text (check_openable_by_torch), and the tokenizer or base of a run resumed, re-scored or sampled
that is gone since it ran (check_run_paths).
"""
import codecs
import errno
import hashlib
import json
import os
import re
import stat
import sys
import tempfile
from contextlib import suppress

from errors import UserError

try:
    import fcntl
except ImportError:  # Windows: folders are not held
    fcntl = None


def write_atomic(path, content):
    """Write text, bytes, or (a function given the open binary file) under a temporary name, flush it
    to disk, then rename: a crash leaves the old file or the new one, never half of one. The folder is
    flushed too, so that the rename, not only the new bytes, survives a power cut."""
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
        fsync_file(os.path.dirname(path) or ".")  # the folder: its new entry
    except Exception as e:  # a failed write leaves nothing; a Ctrl-C or kill leaves it to remove_stale_temporaries
        with suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and e.filename in (None, tmp):  # a write's error names no file: name the one meant
            e.filename = path
        if not isinstance(e, OSError) and isinstance(e.__context__, OSError):  # torch.save's RuntimeError ("unexpected
            raise e.__context__ from None  # pos 704 vs 598") over the write that failed: the disk's own error
        raise


def write_own(path, text):
    """write_atomic text to path, and its sha256 to .NAME.sha256 beside it: the record by which `kept` knows the file
    there as the one this wrote, unchanged since (a report that a script writes again at each run)."""
    write_atomic(_own_record(path), hashlib.sha256(text.encode("utf-8")).hexdigest() + "\n")
    write_atomic(path, text)


def kept(path):
    """Why write_own must not replace what is at path, or None: nothing there, or the file it wrote there, unchanged.
    A file a user wrote or edited there is kept (a report written again at each run took the notes a user had added to
    it), as is a folder, a named pipe or a device of that name."""
    if what := special_file(path):
        return f"{path} is {what}, not a file"
    if not os.path.lexists(path):
        return None
    record = _own_record(path)
    with suppress(OSError, UnicodeDecodeError):  # no record, or none of ours: not known to be ours
        if not special_file(record):  # a named pipe would wait for a writer forever
            with open(record, encoding="utf-8") as f:
                if f.read().strip() == file_sha256(path):
                    return None
    return f"{path} is not the file this script wrote there (it was edited since, or is another's)"


def _own_record(path):
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.sha256")


def fsync_file(path):
    """Flush to disk a file that another handle writes (line by line, as log.jsonl), or a folder's entries (POSIX).
    Best effort: nothing when there is none, or where a read-only handle cannot flush (Windows, a few filesystems'
    folders); non-blocking, should it be a named pipe."""
    with suppress(OSError):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def move_into(tmp, folder, names):
    """Put the files `names` of the folder tmp into folder (tmp itself, where there is no folder yet), replacing only
    those there; the last name, whose presence says the others are complete (prepare's summary.json), goes first and
    comes back last. Each step is on disk before the next (as far as fsync_file can tell it), so that a power cut
    does not leave the last name beside files whose bytes or names were not on disk yet."""
    for name in names:
        fsync_file(os.path.join(tmp, name))
    fsync_file(tmp)  # their names
    if not os.path.exists(folder):
        os.rename(tmp, folder)
        fsync_file(os.path.dirname(folder) or ".")
        return
    last = os.path.join(folder, names[-1])
    if os.path.exists(last):
        os.remove(last)
        fsync_file(folder)  # gone before any file it describes is replaced
    for name in names[:-1]:
        os.replace(os.path.join(tmp, name), os.path.join(folder, name))
    fsync_file(folder)  # their new names before the last one's
    os.replace(os.path.join(tmp, names[-1]), last)
    fsync_file(folder)
    os.rmdir(tmp)


def remove_stale_temporaries(folder, names=None):
    """Remove the temporary files NAME.tmpPID that write_atomic leaves when its process is killed, for the
    processes that no longer run (of `names` only, when given); prints one stderr line for each and returns
    their paths. A file whose process still runs, or may (another user's), is left alone."""
    pattern = re.compile(r"(.+)\.tmp([1-9][0-9]*)")  # as write_atomic writes a process id: no 0 in front
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
        except OSError:  # another process removed it first, or it is not ours to remove (a sticky folder)
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
    """Why no file can be made at path ("F is a file, not a folder", "F is a link to nothing, not a folder", "a
    name N... below F is too long for its filesystem" or "F is not writable (Permission denied)", for the nearest
    existing F above path), or None when it can. Every script asks before its work, not at its first write; the file
    tried leaves no name behind."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if kind := not_a_folder(parent):
        return f"{parent} is {kind}, not a folder"
    limit = os.pathconf(parent, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255  # bytes; Windows: no pathconf
    names = os.path.relpath(os.path.abspath(path), parent).split(os.sep)  # those the writer would make
    if long := [name for name in names if 0 < limit < len(os.fsencode(name))]:  # pathconf's -1: no limit
        return (f"a name {long[0][:16]}... below {parent} is too long for its filesystem "
                f"({len(os.fsencode(long[0]))} bytes, at most {limit})")
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        return f"{parent} is not writable ({e.strerror or e})"


def inside(path, folder):
    """Whether path is folder or lies inside it, links resolved."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def not_a_folder(path):
    """What stands at path where a folder belongs, "a file", "a loop of links" or "a link to nothing", or None where
    a folder or nothing is there. A loop was called a link to nothing, or a file; prepare's --out on one failed only
    once every record was encoded."""
    if os.path.isdir(path) or not os.path.lexists(path):
        return None
    if os.path.exists(path):
        return "a file"
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a loop of links"
    return "a link to nothing"


LOCK = ".lock"
_held = {}  # (device, inode) of each lock file this process holds -> its open descriptor, open until let_go or exit
_taken = {}  # the path of each lock file this process took (hold) -> its (device, inode), for lost
HELD = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)  # flock's errors for a lock another holds (else: no locks)


def hold(folder, names=None):
    """Make folder and hold it until let_go or the end of this process: an exclusive lock on folder/.lock, which the
    system lets go when the process ends (kill -9 too). Then remove the temporaries that killed writes of `names`
    left there (remove_stale_temporaries): only the holder knows that no live writer is behind one, on another host
    too. Returns None when held (or where the filesystem has no locks, as before), else who holds it: "process PID"
    or "another process". The lock file's content is never written: a user's file of that name loses nothing."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK)
    try:
        st = os.stat(path, follow_symlinks=False)
        held = (st.st_dev, st.st_ino) in _held  # by this process already (one process's runs, one after another)
    except OSError:
        held = False
    if not held and fcntl is not None:
        fd = None
        for mode in (os.O_RDWR, os.O_RDONLY):  # read-only: another user's lock file (0644); flock takes it as well
            try:
                fd = os.open(path, mode | os.O_CREAT | os.O_NOFOLLOW, 0o644)  # a link is not followed to its target
                break
            except PermissionError:  # not ours to write (nor, at the second try, to read: not held, as before)
                continue
            except OSError:  # a folder or a link of that name: not held, as before
                break
        if fd is not None:
            st = os.fstat(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                _held[(st.st_dev, st.st_ino)] = fd
                _taken[os.path.abspath(path)] = (st.st_dev, st.st_ino)
            except OSError as e:
                os.close(fd)
                if e.errno in HELD:  # else a filesystem without locks
                    pid = lock_holder(st)
                    return f"process {pid}" if pid else "another process"
    remove_stale_temporaries(folder, names)
    return None


def held_by(folder):
    """Who holds folder now, as hold would refuse it ("process PID" or "another process"), else None (this process,
    nobody, no lock file): seen without holding it, so nothing is made or removed (a dry run's note). Linux's
    /proc/locks names the holder without touching the lock; elsewhere a shared lock is tried and let go at once."""
    if fcntl is None:  # Windows: folders are not held (and os has no O_NOFOLLOW)
        return None
    try:  # O_NONBLOCK: a named pipe of that name is not waited on
        fd = os.open(os.path.join(folder, LOCK), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in _held:
            return None
        if pid := lock_holder(st):
            return f"process {pid}"
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # let go with the descriptor, below
        except OSError as e:
            return "another process" if e.errno in HELD else None
        return None
    finally:
        os.close(fd)


def let_go(folder):
    """Stop holding folder (hold): a run that ends in a process that goes on (tests, a notebook) lets others in."""
    _taken.pop(os.path.abspath(os.path.join(folder, LOCK)), None)
    with suppress(OSError):
        st = os.stat(os.path.join(folder, LOCK), follow_symlinks=False)
        fd = _held.pop((st.st_dev, st.st_ino), None)
        if fd is not None:
            os.close(fd)  # the lock goes with the descriptor


def lost(folder):
    """Whether the lock file by which this process holds folder (hold) is gone or another (the folder deleted while it
    ran, say): a second process can then hold the folder beside this one. False where it took no lock there. The file
    held open keeps its inode, so a new lock file can not have the same one."""
    path = os.path.abspath(os.path.join(folder, LOCK))
    if path not in _taken:
        return False
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return True
    return (st.st_dev, st.st_ino) != _taken[path]


def lock_holder(st):
    """The id of the process that holds a lock on the file of stat result st, from Linux's /proc/locks, else None."""
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            for line in f:  # "1: FLOCK  ADVISORY  WRITE 4242 00:2b:1234 0 EOF"; a waiter's line has "->"
                fields = line.split()
                if len(fields) > 5 and fields[1] != "->" and fields[5] == where and fields[4].isdigit():
                    return int(fields[4]) or None
    except OSError:
        pass
    return None


def special_file(path):
    """What is at path when it is there but is not a regular file ("a folder", "a named pipe", "a device", "a socket"),
    else None (a missing path is for open to name). Readers ask before they open a file they were given: opening a
    named pipe waits for a writer forever, and a device such as /dev/zero never ends."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # missing, a link to nothing, a loop of links: open raises its own OSError
        return None
    if stat.S_ISREG(mode):
        return None
    return ("a folder" if stat.S_ISDIR(mode) else "a named pipe" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a device")


def locale_problem():
    """(why, fix) where the locale is not UTF-8 (LC_ALL=C with PYTHONUTF8=0): Python then takes a non-ASCII name or
    flag as bytes it cannot decode, though they may well be UTF-8; None under a UTF-8 locale."""
    encoding = sys.getfilesystemencoding()
    if codecs.lookup(encoding).name == "utf-8":
        return None
    return (f"non-ASCII characters, which Python cannot pass on as text under this locale ({encoding}: LC_ALL=C, say)",
            "run it under a UTF-8 locale (LC_ALL=C.UTF-8, or PYTHONUTF8=1)")


def check_openable_by_torch(cfg, keys, read_by_python=()):
    """Refuse, naming the fix, a path among cfg's `keys` that torch, SentencePiece or Hugging Face's tokenizers cannot
    open: they take it as UTF-8 text, and Python gives the bytes of a name that the filesystem encoding does not decode
    (any non-ASCII byte under LC_ALL=C with PYTHONUTF8=0, Latin-1 bytes under UTF-8) as lone surrogates, which UTF-8
    cannot encode. Such an out_dir trained, and then its own ckpt.pt could not be read to resume or re-score it. A
    path that the filesystem encoding cannot encode (a config file's "out/é" under LC_ALL=C) no file has at all:
    refused among the keys `read_by_python` too (Python opens lone surrogates), which said "does not exist"."""
    for key in (*keys, *read_by_python):
        try:
            os.fsencode(str(cfg[key]))  # a name the filesystem encoding holds: "out/é" under LC_ALL=C does not
            if key in keys:
                str(cfg[key]).encode("utf-8")  # and text torch takes: no lone surrogates
        except UnicodeError:
            why, fix = locale_problem() or ("bytes that are not UTF-8 text", "name it in UTF-8")
            who = "torch and the tokenizers cannot open" if key in keys else "no file or folder can have"
            raise UserError(f"{key} {cfg[key]} holds {why}, and {who} such a path; {fix}, or give --{key} an ASCII "
                            "path.") from None


def check_run_paths(cfg, keys, script="train.py", ran_in=None):
    """Resume, re-scoring and sample.py take the run's tokenizer and base from its config: a missing one is refused,
    saying where to put it back (an absolute path) or where to run `script` from (a relative one): the folder that
    train.py ran in, named (ran_in, see folder_ran_in) where the path is found from there."""
    for key in keys:
        if cfg[key] != "scratch" and not os.path.exists(cfg[key]):
            there = ran_in is not None and os.path.exists(os.path.join(ran_in, cfg[key]))
            folder = f"{ran_in}, the folder that train.py ran in" if there else "the folder that train.py ran in"
            fix = ("it was moved or deleted since the run: put it back there" if os.path.isabs(cfg[key]) else
                   f"run {script} in {folder} (the run's paths are relative to it)")
            raise UserError(f"the run's {key} {cfg[key]} is not found from here; {fix}.")


def folder_ran_in(out_dir, ran_with):
    """The folder that train.py ran in, where the run's relative paths lead from: the run's folder as found from here
    (out_dir) less the out_dir that the run was given there (ran_with), e.g. ../proj for ../proj/out/x given out/x.
    None where ran_with is absolute or climbs out (..), or the two do not end alike (the run's folder was renamed)."""
    then, now = os.path.normpath(ran_with), os.path.abspath(out_dir)
    if os.path.isabs(then) or then.split(os.sep)[0] == os.pardir:
        return None
    if then == os.curdir:
        return now
    return (now[:-len(then) - 1] or os.sep) if now.endswith(os.sep + then) else None


def flag_path(text):
    """A path given as a flag's value (or in a config file), ~ expanded: the shell does it in `--out ~/x` but not in
    --out=~/x, which would make a folder named ~ here (and the `rm -rf ~` that removes it would wipe the home
    folder)."""
    return os.path.expanduser(text)


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


TOO_DEEP = "is nested too deeply to read (a thousand or more [ or { inside each other)"


def int_digits_limit():  # 0: none, as on Python before 3.9.14 and 3.10.7, which convert an integer of any length
    return getattr(sys, "get_int_max_str_digits", lambda: 0)()


def too_long():  # json raises a ValueError (not a JSONDecodeError) on an integer longer than Python converts
    return f"holds a number of more than {int_digits_limit():,} digits, too long to read"


class DuplicateKey(ValueError):
    """A JSON object that gives one key twice: json would keep its last value alone, the other lost unseen."""


def unique_keys(pairs):
    """json's object_pairs_hook for records: their object, or DuplicateKey naming the first key given twice."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise DuplicateKey(key)
        seen.add(key)
    return dict(pairs)


def value_problem(e):
    """What a ValueError out of json (not a JSONDecodeError) says is wrong, as the words after a record's name."""
    if isinstance(e, DuplicateKey):
        return f"gives the key {e.args[0]!r} twice (JSON would keep only the last value)"
    return too_long()


def duplicate_key_line(text):
    """The line on which the innermost object that gives a key twice begins in the JSON text: parsed again in pure
    Python (slow, but only for a message), whose scanner, unlike C's, lets parse_object see where each object is."""
    starts, decoder = [], json.JSONDecoder(object_pairs_hook=unique_keys)

    def parse_object(s_and_end, *args):
        starts.append(s_and_end[1] - 1)  # the "{" (s_and_end[1] is just past it)
        value = json.decoder.JSONObject(s_and_end, *args)
        starts.pop()
        return value

    decoder.parse_object = parse_object
    decoder.scan_once = json.scanner.py_make_scanner(decoder)
    with suppress(ValueError, RecursionError):
        decoder.decode(text)
    return text.count("\n", 0, starts[-1]) + 1 if starts else 1


def ends_in_a_long_integer(text):
    """Whether text ends in an integer of more digits than Python converts (too_long), or in one and the "." or "e"
    that may begin its fraction or exponent: the text after it may make it a float's, which json reads (as inf)."""
    limit = int_digits_limit()
    backwards = text[:-limit - 4:-1]  # its last limit + 3 characters, last first: re.match is linear, re.search not
    digits = re.match(r"(\.|[-+]?[eE])?([0-9]*)", backwards).group(2)
    return 0 < limit < len(digits)


def json_kind(value):
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


def read_json(path, fix, any_value=False, lines_too=False, records=False, limit=None):
    """The JSON object in the file at path (any JSON value with any_value), UTF-8 with or without a byte-order mark;
    with lines_too, None for JSON lines (a second value after the first); with records (a task's raw file, a study
    run's records, a configuration), an object giving a key twice is refused; a file over limit bytes is refused
    unread. Anything else is a UserError "<path> <what is wrong>; <fix>", never a decoder's own error: its traceback
    would name no file."""
    if what := special_file(path):  # a named pipe would wait for a writer forever, a device never end
        raise UserError(f"{path} is {what}, not a file; {fix}")
    if limit and os.path.isfile(path) and os.path.getsize(path) > limit:  # read whole: a wrong file's gigabytes
        raise UserError(f"{path} is over {limit >> 20} MiB, far more than a configuration file holds; {fix}")
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
        value = json.loads(text, object_pairs_hook=unique_keys if records else None)
    except OSError as e:  # missing, not ours to read, a loop of links
        raise UserError(f"{path} can not be read ({e.strerror or e}); {fix}") from None
    except json.JSONDecodeError as e:
        if lines_too and e.msg == "Extra data":
            return None
        raise UserError(f"{path} line {e.lineno} is not valid JSON ({e.msg}); {fix}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason}); save it as UTF-8 or {fix}") from None
    except RecursionError:
        raise UserError(f"{path} {TOO_DEEP}; {fix}") from None
    except DuplicateKey as e:
        raise UserError(f"{path} line {duplicate_key_line(text)} {value_problem(e)}; {fix}") from None
    except ValueError:  # a number of thousands of digits
        raise UserError(f"{path} {too_long()}; {fix}") from None
    if not any_value and not isinstance(value, dict):
        raise UserError(f"{path} holds {json_kind(value)}, not a JSON object; {fix}")
    return value
