"""files.py: a file is whole or absent, a killed process's temporaries are removed once it is gone, a folder
that can not be written is named before any work, and a damaged JSON file is one sentence naming it and the fix.

    python -m pytest -q test_files.py
"""
import contextlib
import errno
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch

import files
from conftest import FullDisk, held_by_another_process, named_pipe, non_ascii_names
from errors import UserError


def dead_pid():
    """The id of a process that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_remove_stale_temporaries_removes_dead_processes_files_only(tmp_path, capsys):
    dead, alive = dead_pid(), os.getppid()
    gone = [tmp_path / f"ckpt.pt.tmp{dead}", tmp_path / f"model.pt.tmp{dead}"]
    kept = [tmp_path / f"ckpt.pt.tmp{alive}", tmp_path / "ckpt.pt", tmp_path / f"ckpt.pt.tmp{dead}x",
            tmp_path / f"notes.tmp-{dead}"]
    for path in gone + kept:
        path.write_text("x")
    (tmp_path / f"dir.tmp{dead}").mkdir()
    assert files.remove_stale_temporaries(tmp_path, names=("ckpt.pt",)) == [str(gone[0])]
    assert files.remove_stale_temporaries(tmp_path) == [str(gone[1])]
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and f"removed a leftover temporary file {gone[1]} of a process ({dead})" in err
    assert not any(p.exists() for p in gone) and all(p.exists() for p in kept)
    assert (tmp_path / f"dir.tmp{dead}").is_dir()
    assert files.remove_stale_temporaries(tmp_path / "absent") == []


def test_remove_stale_temporaries_leaves_a_link_named_like_a_temporary(tmp_path):
    """write_atomic writes plain files: a link named ckpt.pt.tmpPID of a dead process is a user's, and stays."""
    target = tmp_path / "mine.pt"
    target.write_text("mine")
    link = tmp_path / f"ckpt.pt.tmp{dead_pid()}"
    link.symlink_to(target)
    assert files.remove_stale_temporaries(tmp_path) == []
    assert link.is_symlink() and target.read_text() == "mine"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this system")
def test_remove_stale_temporaries_leaves_a_named_pipe_named_like_a_temporary(tmp_path):
    """write_atomic writes plain files: a named pipe called ckpt.pt.tmpPID of a dead process is a user's, and stays."""
    pipe = tmp_path / f"ckpt.pt.tmp{dead_pid()}"
    os.mkfifo(pipe)
    assert files.remove_stale_temporaries(tmp_path) == []
    assert stat.S_ISFIFO(os.stat(pipe).st_mode)


def test_write_atomic_keeps_the_old_file_until_the_new_one_is_on_disk(tmp_path, monkeypatch):
    """While the new content is written the old file is whole and the new one lies under NAME.tmpPID; the
    temporary file is flushed and fsynced with all its bytes before it is renamed over the old one, and (POSIX) the
    folder is fsynced after the rename, so that a power cut keeps the rename too."""
    path = tmp_path / "deep" / "er" / "results.json"  # missing folders are made
    files.write_atomic(str(path), "old")
    events, fsync, replace = [], os.fsync, os.replace

    def record(fd):
        st = os.fstat(fd)
        folder = stat.S_ISDIR(st.st_mode) and os.path.samestat(st, os.stat(path.parent))
        events.append(("fsync", "the folder" if folder else st.st_size))
        return fsync(fd)
    monkeypatch.setattr(os, "fsync", record)
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", a, b)), replace(a, b))[1])
    new = b"new content " * 10

    def content(f):
        f.write(new)
        assert path.read_text() == "old"
        assert sorted(os.listdir(path.parent)) == sorted(["results.json", f"results.json.tmp{os.getpid()}"])
    files.write_atomic(str(path), content)
    folder = [("fsync", "the folder")] if os.name == "posix" else []
    assert events == [("fsync", len(new)), ("replace", f"{path}.tmp{os.getpid()}", str(path))] + folder
    assert path.read_bytes() == new and os.listdir(path.parent) == ["results.json"]


def test_write_atomic_writes_text_as_utf8_and_bytes_as_given(tmp_path):
    """results.json and the summaries are read back as UTF-8 (files.read_json): text with any character is written
    as UTF-8, not in a locale's encoding, and bytes go to disk unchanged."""
    text = "héllo wörld 🙂 日本語 ünïcode\n"
    files.write_atomic(str(tmp_path / "a.json"), text)
    assert (tmp_path / "a.json").read_bytes() == text.encode("utf-8")
    raw = bytes(range(256))
    files.write_atomic(str(tmp_path / "b.bin"), raw)
    assert (tmp_path / "b.bin").read_bytes() == raw


def test_a_write_atomic_cut_short_leaves_the_old_file_and_a_temporary_that_is_cleaned_once_its_process_is_gone(
        tmp_path, monkeypatch):
    path = tmp_path / "report.md"
    files.write_atomic(str(path), "old")

    def crash(f):
        f.write(b"half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        files.write_atomic(str(path), crash)
    assert path.read_text() == "old"
    assert files.remove_stale_temporaries(tmp_path) == []  # this process still runs: its file stays
    monkeypatch.setattr(files, "process_is_running", lambda pid: pid != os.getpid())
    assert files.remove_stale_temporaries(tmp_path) == [f"{path}.tmp{os.getpid()}"]
    assert os.listdir(tmp_path) == ["report.md"]


def test_a_file_write_own_wrote_is_replaceable_and_one_written_or_edited_by_a_user_is_kept(tmp_path):
    """kept: only nothing, or the file write_own wrote unchanged since, may be replaced; a user's own file, one edited
    since (even to the same length), one whose record is gone or damaged, and a folder are kept, each said why."""
    path = tmp_path / "report.md"
    assert files.kept(str(path)) is None  # nothing there
    files.write_own(str(path), "## tables\n")
    assert path.read_text() == "## tables\n" and files.kept(str(path)) is None
    files.write_own(str(path), "## new tables\n")  # replaced by its writer, and still known as its own
    assert path.read_text() == "## new tables\n" and files.kept(str(path)) is None
    user = f"{path} is not the file this script wrote there (it was edited since, or is another's)"
    path.write_text("## new Tables\n")  # edited by hand
    assert files.kept(str(path)) == user
    path.write_text("## new tables\n")  # as written again: its own once more
    assert files.kept(str(path)) is None
    record = tmp_path / ".report.md.sha256"
    for damage in ("gone", "text", "a named pipe"):
        record.unlink(missing_ok=True)
        if damage == "text":
            record.write_bytes(b"\xff not a hash")
        with named_pipe(record, b"x") if damage == "a named pipe" else contextlib.nullcontext():
            assert files.kept(str(path)) == user  # not known to be its own
    (tmp_path / "mine.md").write_text("my notes\n")
    assert files.kept(str(tmp_path / "mine.md")) == f"{tmp_path / 'mine.md'} is not the file this script wrote " \
                                                    "there (it was edited since, or is another's)"
    (tmp_path / "folder.md").mkdir()
    assert files.kept(str(tmp_path / "folder.md")) == f"{tmp_path / 'folder.md'} is a folder, not a file"


@pytest.mark.parametrize("fault", ["content raises", "content of the wrong type", "rename fails"])
def test_a_failed_write_atomic_removes_its_temporary_and_keeps_the_old_file(tmp_path, fault):
    path = tmp_path / "report.md"
    files.write_atomic(str(path), "old")

    def full_disk(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")
    content = {"content raises": full_disk, "content of the wrong type": 5}.get(fault, "new")
    if fault == "rename fails":
        path = tmp_path / "folder.md"
        path.mkdir()  # os.replace cannot put a file over a folder
    with pytest.raises((OSError, TypeError)):
        files.write_atomic(str(path), content)
    assert sorted(os.listdir(tmp_path)) == ["folder.md", "report.md"][fault != "rename fails":]
    assert (tmp_path / "report.md").read_text() == "old"


def test_a_torch_save_that_fills_the_disk_raises_the_disks_error_not_torchs(tmp_path):
    """torch.save turns the write that failed into a RuntimeError ("unexpected pos 297 vs 244"): write_atomic raises
    the disk's OSError instead, which the scripts name in one sentence."""
    path = tmp_path / "ckpt.pt"
    files.write_atomic(str(path), "old")
    with pytest.raises(OSError, match="No space left on device"):
        files.write_atomic(str(path), lambda f: torch.save({"w": torch.zeros(1000)}, FullDisk(f)))
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["ckpt.pt"]


def test_a_failed_writers_own_error_is_raised_when_no_disk_error_lies_under_it(tmp_path):
    """Only an OSError underneath replaces the error raised (torch.save's over a full disk): a writer's own error,
    raised while it handled another, stays its own."""
    def broken(f):
        try:
            {}["step"]
        except KeyError:
            raise ValueError("the writer's own error") from None
    with pytest.raises(ValueError, match="the writer's own error"):
        files.write_atomic(str(tmp_path / "x.json"), broken)
    assert os.listdir(tmp_path) == []


def test_blocked_parent_is_none_where_a_file_can_be_made_and_leaves_no_name_behind(tmp_path):
    assert files.blocked_parent(str(tmp_path / "new" / "deeper" / "ckpt.pt")) is None  # made later, by the writer
    assert files.blocked_parent(str(tmp_path / "ckpt.pt")) is None
    assert os.listdir(tmp_path) == []


def test_blocked_parent_names_the_nearest_existing_folder_above_the_path_and_why(tmp_path, read_only):
    (tmp_path / "a_file").write_text("mine")
    (tmp_path / "dangling").symlink_to(tmp_path / "nothing")
    locked = tmp_path / "locked"
    locked.mkdir()
    read_only(locked)
    assert files.blocked_parent(str(tmp_path / "a_file" / "sub" / "x.pt")) == \
        f"{tmp_path / 'a_file'} is a file, not a folder"
    assert files.blocked_parent(str(tmp_path / "dangling" / "x.pt")) == \
        f"{tmp_path / 'dangling'} is a link to nothing, not a folder"
    (tmp_path / "loop").symlink_to(tmp_path / "loop")  # was called a link to nothing
    assert files.blocked_parent(str(tmp_path / "loop" / "x.pt")) == \
        f"{tmp_path / 'loop'} is a loop of links, not a folder"
    assert files.blocked_parent(str(locked / "new" / "x.pt")) == f"{locked} is not writable (Permission denied)"
    assert (tmp_path / "a_file").read_text() == "mine" and os.listdir(locked) == []


@non_ascii_names
def test_blocked_parent_names_a_name_too_long_for_its_folder_where_making_it_fails(tmp_path):
    """The scripts checked the folder's permissions only: a name past the filesystem's limit passed, and the first
    write failed (train.py: a traceback, once the demo's base was pretrained; the others: advice to free space)."""
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    for name, fits in (("x" * (limit + 1), False), ("\u00e9" * (limit // 2 + 1), False), ("x" * limit, True)):
        path = tmp_path / name / "ckpt.pt"
        blocker = files.blocked_parent(str(path))
        assert (blocker is None) == fits, (len(name), blocker)
        if not fits:
            assert blocker.startswith(f"a name {name[:16]}... below {tmp_path} is too long for its filesystem")
            with pytest.raises(OSError) as made:
                os.makedirs(path.parent)
            assert made.value.errno == errno.ENAMETOOLONG
        else:
            os.makedirs(path.parent)  # what blocked_parent passes, the writer can make


def test_blocked_parent_lets_any_name_through_where_the_filesystem_sets_no_name_limit(tmp_path, monkeypatch):
    """pathconf gives -1 where a filesystem has no limit on a name's length: no name is too long for it then."""
    monkeypatch.setattr(files.os, "pathconf", lambda path, name: -1)
    assert files.blocked_parent(str(tmp_path / "new" / "ckpt.pt")) is None


def test_process_is_running_for_this_process_and_not_for_an_ended_one():
    assert files.process_is_running(os.getpid()) and not files.process_is_running(dead_pid())
    assert files.process_is_running(0) and files.process_is_running(-1)  # not a process of its own: never removed


def test_hold_refuses_a_folder_that_a_live_process_holds_naming_it_and_leaves_its_temporaries(tmp_path):
    """While one process holds a folder, another is refused (with the holder's process id) and removes nothing there,
    not even a temporary whose process id runs nowhere here (a writer's on another host); once the holder ends, kill
    -9 too, the folder is held by the next, which then removes it. A process may hold a folder it holds again."""
    folder = tmp_path / "run"
    other = held_by_another_process(folder)
    temporary = folder / f"ckpt.pt.tmp{dead_pid()}"
    temporary.write_text("half a checkpoint")
    try:
        assert files.hold(str(folder), ("ckpt.pt",)) == f"process {other.pid}"
        assert temporary.exists()
    finally:
        other.kill()
        other.wait()
    assert files.hold(str(folder), ("ckpt.pt",)) is None and not temporary.exists()
    assert files.hold(str(folder)) is None
    again = subprocess.run([sys.executable, "-c", "import sys, files; print(files.hold(sys.argv[1]))", str(folder)],
                           cwd=os.path.dirname(files.__file__), capture_output=True, text=True)
    assert again.stdout == f"process {os.getpid()}\n"


def test_let_go_lets_another_process_hold_the_folder_and_a_finished_run_has_let_go_of_its_out_dir(tmp_path):
    """A run that ends in a process that goes on (tests, a notebook) lets go of its out_dir, as a process that ends
    does: another process may then hold it, and this one holds no descriptor for it any more."""
    folder = tmp_path / "run"
    assert files.hold(str(folder)) is None and files.hold(str(folder)) is None
    held = len(files._held)
    files.let_go(str(folder))
    files.let_go(str(folder))  # twice, or a folder never held: nothing to do
    files.let_go(str(tmp_path / "never"))
    assert len(files._held) == held - 1
    other = held_by_another_process(folder)  # asserts it holds it
    other.kill()
    other.wait()


def test_held_by_names_a_live_holder_without_holding_the_folder_nor_making_anything(tmp_path, monkeypatch):
    """A dry run asks who holds its out_dir: the live holder's process, as hold's refusal names it, also where only
    the lock itself says so (no /proc/locks); the holder keeps the folder (a third process is refused) and once it
    ends the next one holds it. A folder nobody holds, one not there, and this process's own are None, and asking
    makes neither the folder nor its lock file."""
    folder, nowhere = tmp_path / "run", tmp_path / "nowhere"
    assert files.held_by(str(nowhere)) is None and not nowhere.exists()
    other = held_by_another_process(folder)
    try:
        assert files.held_by(str(folder)) == f"process {other.pid}"
        with monkeypatch.context() as m:
            m.setattr(files, "lock_holder", lambda st: None)
            assert files.held_by(str(folder)) == "another process"
        third = subprocess.run([sys.executable, "-c", "import sys, files; print(files.hold(sys.argv[1]))", str(folder)],
                               cwd=os.path.dirname(files.__file__), capture_output=True, text=True)
        assert third.stdout == f"process {other.pid}\n"
    finally:
        other.kill()
        other.wait()
    monkeypatch.setattr(files, "lock_holder", lambda st: None)  # the lock tried: let go at once
    assert files.held_by(str(folder)) is None
    next_one = held_by_another_process(folder)  # asserts it holds it
    next_one.kill()
    next_one.wait()
    assert files.hold(str(folder)) is None and files.held_by(str(folder)) is None
    files.let_go(str(folder))


def test_hold_makes_the_folder_and_never_writes_its_lock_file_nor_follows_a_link_of_that_name(tmp_path):
    assert files.hold(str(tmp_path / "new" / "run")) is None and os.listdir(tmp_path / "new" / "run") == [files.LOCK]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / files.LOCK).write_text("my notes")
    assert files.hold(str(mine)) is None and (mine / files.LOCK).read_text() == "my notes"
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / files.LOCK).symlink_to(tmp_path / "nothing")  # a link to nothing: opening it would make its target
    assert files.hold(str(linked)) is None and not (tmp_path / "nothing").exists()


def test_file_sha256_is_the_hash_of_the_bytes(tmp_path):
    import hashlib
    (tmp_path / "t.model").write_bytes(b"\x00tokenizer\xff")
    assert files.file_sha256(tmp_path / "t.model") == hashlib.sha256(b"\x00tokenizer\xff").hexdigest()


def test_a_writers_own_os_error_raised_while_it_handled_another_stays_the_error_raised(tmp_path):
    """The OSError underneath replaces only an error that is not one itself (torch.save's RuntimeError): a writer's
    own OSError, raised while it handled another, is the one raised."""
    def writer(f):
        try:
            open(tmp_path / "missing" / "source.bin", "rb")
        except FileNotFoundError:
            raise PermissionError(13, "the writer's own error")
    with pytest.raises(PermissionError, match="the writer's own error"):
        files.write_atomic(str(tmp_path / "x.bin"), writer)
    assert os.listdir(tmp_path) == []


def test_remove_stale_temporaries_of_no_names_removes_nothing(tmp_path):
    """names limits the removal to those names' temporaries: an empty collection names none, not every one."""
    stale = tmp_path / f"ckpt.pt.tmp{dead_pid()}"
    stale.write_text("x")
    assert files.remove_stale_temporaries(tmp_path, names=()) == [] and stale.exists()
    assert files.remove_stale_temporaries(tmp_path, names=("ckpt.pt",)) == [str(stale)]


def test_a_process_of_another_user_counts_as_running_and_its_temporaries_stay(tmp_path, monkeypatch):
    """os.kill(pid, 0) on another user's process raises PermissionError: it runs, so its files are left alone."""
    pid = dead_pid()
    (tmp_path / f"ckpt.pt.tmp{pid}").write_text("theirs")

    def kill(p, sig):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(os, "kill", kill)
    assert files.process_is_running(pid)
    assert files.remove_stale_temporaries(tmp_path) == [] and (tmp_path / f"ckpt.pt.tmp{pid}").read_text() == "theirs"


def test_names_like_a_temporary_without_a_process_id_are_a_users_and_stay(tmp_path):
    """Only NAME.tmpPID is write_atomic's: ckpt.pt.tmp (no id) or ckpt.pt.tmpX is left alone, without an error."""
    dead = dead_pid()
    users = [tmp_path / "ckpt.pt.tmp", tmp_path / "ckpt.pt.tmpx", tmp_path / ".tmp1", tmp_path / f".tmp{dead}"]
    for path in users:
        path.write_text("mine")
    stale = tmp_path / f"ckpt.pt.tmp{dead}"
    stale.write_text("x")
    assert files.remove_stale_temporaries(tmp_path) == [str(stale)]
    assert all(p.read_text() == "mine" for p in users)


def test_special_file_names_what_is_there_but_is_no_regular_file(tmp_path):
    """A named pipe (reading waits for a writer forever), a device (/dev/zero never ends), a socket or a folder is
    named, through links too; a regular file, a missing path and a loop of links are left to open to name."""
    import socket
    (tmp_path / "file").write_text("x")
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "folder").mkdir()
    os.symlink(tmp_path / "pipe", tmp_path / "link_to_pipe")
    os.symlink("loop", tmp_path / "loop")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "sock"))
    try:
        found = {name: files.special_file(tmp_path / name)
                 for name in ("file", "pipe", "folder", "link_to_pipe", "loop", "sock", "missing")}
    finally:
        server.close()
    assert found == {"file": None, "pipe": "a named pipe", "folder": "a folder", "link_to_pipe": "a named pipe",
                     "loop": None, "sock": "a socket", "missing": None}
    assert files.special_file(os.devnull) == files.special_file("/dev/zero") == "a device"


@pytest.mark.parametrize("fault", ["the write fails", "the temporary can not be made"])
def test_a_failed_write_atomic_names_the_file_meant_not_its_temporary(tmp_path, fault):
    """The scripts print the OSError's file name: a write's error (which names no file) and the temporary's own
    error both name the path that was to be written."""
    path = tmp_path / "ckpt.pt"
    if fault == "the write fails":
        content = lambda f: FullDisk(f, room=0).write(b"x")
    else:
        (tmp_path / f"ckpt.pt.tmp{os.getpid()}").mkdir()  # open() of the temporary raises IsADirectoryError
        content = "new"
    with pytest.raises(OSError) as raised:
        files.write_atomic(str(path), content)
    assert raised.value.filename == str(path) and not path.exists()


def test_a_temporary_removed_by_another_process_first_is_passed_over(tmp_path, capsys, monkeypatch):
    """Two processes may clean one folder: a temporary the other removed between the look and the removal is not
    an error, nor counted as removed here."""
    dead = dead_pid()
    first, second = tmp_path / f"a.pt.tmp{dead}", tmp_path / f"b.pt.tmp{dead}"
    first.write_text("x")
    second.write_text("x")

    def other_removes_first(pid):
        if first.exists():
            first.unlink()
        return False
    monkeypatch.setattr(files, "process_is_running", other_removes_first)
    assert files.remove_stale_temporaries(tmp_path) == [str(second)]
    assert capsys.readouterr().err.count("\n") == 1 and os.listdir(tmp_path) == []


def test_a_temporary_whose_process_id_no_system_has_counts_as_running_and_stays(tmp_path):
    """An id too large for os.kill (OverflowError) is not known to have ended: its file is left, without an error."""
    huge = tmp_path / f"ckpt.pt.tmp{10 ** 30}"
    huge.write_text("x")
    assert files.process_is_running(10 ** 30)
    assert files.remove_stale_temporaries(tmp_path) == [] and huge.exists()


def test_hold_removes_the_temporaries_of_the_names_given_only(tmp_path):
    """A holder knows its own writers' temporaries: of NAME.tmpPID left by a dead process, only those of `names` go;
    a user's file named like one stays."""
    folder = tmp_path / "run"
    folder.mkdir()
    pid = dead_pid()
    ours, users = folder / f"ckpt.pt.tmp{pid}", folder / f"notes.txt.tmp{pid}"
    for path in (ours, users):
        path.write_text("x")
    assert files.hold(str(folder), ("ckpt.pt",)) is None
    assert not ours.exists() and users.read_text() == "x"
    files.let_go(str(folder))


def test_a_filesystem_without_locks_lets_the_folder_be_used_as_before(tmp_path, monkeypatch):
    """flock fails with another error than "held" (ENOLCK, EOPNOTSUPP: NFS without locks): the folder is not held,
    as before locks were taken, rather than refused as if another process held it."""
    import errno

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(files.fcntl, "flock", no_locks)
    stale = tmp_path / "run" / f"ckpt.pt.tmp{dead_pid()}"
    stale.parent.mkdir()
    stale.write_text("x")
    assert files.hold(str(tmp_path / "run"), ("ckpt.pt",)) is None and not stale.exists()


@pytest.mark.parametrize("code", ["EWOULDBLOCK", "EAGAIN", "EACCES"])
def test_each_error_that_says_the_lock_is_held_refuses_the_folder(tmp_path, monkeypatch, code):
    """flock says "held" with EWOULDBLOCK (EAGAIN), and some systems' locks with EACCES: the folder is refused,
    never taken for one on a filesystem without locks."""
    import errno

    def held(fd, operation):
        raise OSError(getattr(errno, code), "held")
    monkeypatch.setattr(files.fcntl, "flock", held)
    monkeypatch.setattr(files, "lock_holder", lambda st: None)
    assert files.hold(str(tmp_path / "run")) == "another process"


def test_lock_holder_reads_the_holders_line_of_that_file_and_skips_waiters_and_open_file_locks(tmp_path,
                                                                                               monkeypatch):
    """/proc/locks lists a waiter with "->" and an open file description lock with pid -1: neither is the holder."""
    import io
    (tmp_path / "f").write_text("")
    st = os.stat(tmp_path / "f")
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    lines = (f"1: OFDLCK ADVISORY WRITE -1 {where} 0 EOF\n2: FLOCK  ADVISORY  WRITE 77 00:00:1 0 EOF\n"
             f"3: FLOCK  ADVISORY  WRITE 4242 {where} 0 EOF\n3: -> FLOCK  ADVISORY  WRITE 4343 {where} 0 EOF\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda file, *a, **k: io.StringIO(lines) if file == "/proc/locks"
                        else real_open(file, *a, **k))
    assert files.lock_holder(st) == 4242
    lines = f"1: OFDLCK ADVISORY WRITE -1 {where} 0 EOF\n"
    assert files.lock_holder(st) is None
    lines = f"1: FLOCK  ADVISORY  WRITE 0 {where} 0 EOF\n"  # a holder in another pid namespace shows as 0: no id
    assert files.lock_holder(st) is None


FIX = "put the file you meant there"
HOSTILE_JSON = {  # what the file is -> its bytes (None: made by the test), what the message says between path and fix
    "not UTF-8": (b'{"a": "caf\xe9"}', "is not UTF-8 text (invalid continuation byte); save it as UTF-8 or"),
    "not JSON": (b'{"a": 1,\n "b": }', "line 2 is not valid JSON (Expecting value);"),
    "nested too deeply": (b"[" * 100_000 + b"]" * 100_000,  # json's RecursionError
                          "is nested too deeply to read (a thousand or more [ or { inside each other);"),
    "a 5000-digit number": (b'{"a": ' + b"9" * 5000 + b"}",  # json's ValueError, not a JSONDecodeError
                            f"holds a number of more than {sys.get_int_max_str_digits():,} digits, too long to read;"),
    "a list": (b"[{}]", "holds a list, not a JSON object;"),
    "a string": (b'"{}"', "holds a string, not a JSON object;"),
    "a number": (b"1.5", "holds a number, not a JSON object;"),
    "null": (b"null", "holds null, not a JSON object;"),
    "a boolean": (b"true", "holds a boolean, not a JSON object;"),
    "a folder": (None, "is a folder, not a file;"),  # IsADirectoryError
    "a named pipe": (None, "is a named pipe, not a file;"),  # opened, it waits for a writer forever
    "missing": (None, "can not be read (No such file or directory);"),
    "unreadable": (b"{}", "can not be read (Permission denied);"),  # PermissionError
    "a loop of links": (None, "can not be read (Too many levels of symbolic links);"),  # an OSError, even for root
}


@pytest.mark.parametrize("case", HOSTILE_JSON)
def test_read_json_names_every_damaged_file_and_the_fix_in_one_sentence(tmp_path, case):
    """Every script reads its JSON files with read_json: a file that is not a JSON object is one UserError naming it,
    what is wrong, and the caller's fix, never a decoder's or open's own exception (a traceback naming no file)."""
    path = tmp_path / "x.json"
    content, says = HOSTILE_JSON[case]
    if content is not None:
        path.write_bytes(content)
    if case == "unreadable":
        path.chmod(0)
        if os.access(path, os.R_OK):
            pytest.skip("this user (root) reads a file of mode 000")
    elif case == "a folder":
        path.mkdir()
    elif case == "a loop of links":
        path.symlink_to(path.name)
    with named_pipe(path, b"{}") if case == "a named pipe" else contextlib.nullcontext():
        with pytest.raises(UserError) as error:
            files.read_json(path, FIX)
    assert str(error.value) == f"{path} {says} {FIX}"
    assert error.value.__context__ is None or error.value.__suppress_context__  # no decoder's traceback above it


def test_read_json_refuses_a_key_given_twice_in_records_naming_its_line_and_reads_config_files_as_json_does(tmp_path):
    """A task's raw file (records=True) that gives a key twice in one object is refused on the line where that object
    begins, however deep; a config file (tokenizer.json, config.json) is read as json reads it, the last value kept."""
    path = tmp_path / "x.json"
    path.write_text('{"Data": [\n {"a": 1},\n {"a": 2, "b": {"c": 3,\n  "c": 4}}]}')
    with pytest.raises(UserError) as error:
        files.read_json(path, FIX, records=True)
    assert str(error.value) == f"{path} line 3 gives the key 'c' twice (JSON would keep only the last value); {FIX}"
    assert files.read_json(path, FIX) == {"Data": [{"a": 1}, {"a": 2, "b": {"c": 4}}]}
    path.write_text('{"a": 1,\n "a": 2}')
    with pytest.raises(UserError, match=f"^{path} line 1 gives the key 'a' twice "):
        files.read_json(path, FIX, records=True)


def test_read_json_reads_a_byte_order_mark_any_value_and_tells_json_lines_apart(tmp_path):
    """A byte-order mark is read past, as the raw files of the tasks have it; any_value gives what is not an object
    too, and lines_too None for JSON lines (one value per line), whose second value json calls "Extra data"."""
    path = tmp_path / "x.json"
    path.write_bytes(b'\xef\xbb\xbf{"a": [1, "\xc3\xa9"]}')
    assert files.read_json(path, FIX) == {"a": [1, "\u00e9"]}
    path.write_text("[1, 2]")
    assert files.read_json(path, FIX, any_value=True) == [1, 2]
    path.write_text('{"a": 1}\n{"a": 2}\n')
    assert files.read_json(path, FIX, lines_too=True) is None
    with pytest.raises(UserError, match=f"^{path} line 2 is not valid JSON \\(Extra data\\); {FIX}$"):
        files.read_json(path, FIX)
    path.write_text('{"a": 1,\n "b": }\n')  # damaged JSON, not JSON lines: named all the same
    with pytest.raises(UserError, match=f"^{path} line 2 is not valid JSON \\(Expecting value\\); {FIX}$"):
        files.read_json(path, FIX, lines_too=True)


def test_a_lock_file_this_process_may_only_read_still_refuses_a_folder_a_live_process_holds(tmp_path, monkeypatch):
    """Another user's run leaves its .lock readable but not writable by others (0644): a second user's run there opens
    it read-only, which flock takes as well, so it is refused while that run lives, never let in unheld; once the
    holder is killed (kill -9), it holds the folder against a third process. Here os.open refuses this process
    write access to the lock file (the tests may run as root, whom file modes do not stop)."""
    folder = tmp_path / "run"
    other = held_by_another_process(folder)
    real_open = os.open

    def read_only_lock(path, flags, *args):
        if os.path.basename(path) == files.LOCK and flags & (os.O_RDWR | os.O_WRONLY):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real_open(path, flags, *args)
    monkeypatch.setattr(os, "open", read_only_lock)
    try:
        assert files.hold(str(folder)) == f"process {other.pid}"
    finally:
        other.kill()
        other.wait()
    assert files.hold(str(folder)) is None
    third = subprocess.run([sys.executable, "-c", "import sys, files; print(files.hold(sys.argv[1]))", str(folder)],
                           cwd=os.path.dirname(files.__file__), capture_output=True, text=True)
    assert third.stdout == f"process {os.getpid()}\n"
    files.let_go(str(folder))


def test_a_stale_temporary_that_can_not_be_removed_is_left_and_the_folder_held(tmp_path, monkeypatch, capsys):
    """A dead process's temporary that this one may not remove (another user's in a sticky folder: EPERM) stays where
    it is, unreported: holding the folder goes on, rather than ending the run in a traceback."""
    folder = tmp_path / "run"
    folder.mkdir()
    theirs, ours = folder / f"ckpt.pt.tmp{dead_pid()}", folder / f"adapter.pt.tmp{dead_pid()}"
    for path in (theirs, ours):
        path.write_text("x")
    real_remove = os.remove

    def sticky(path, *args, **kwargs):
        if os.path.basename(path) == theirs.name:
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), path)
        return real_remove(path, *args, **kwargs)
    monkeypatch.setattr(os, "remove", sticky)
    assert files.hold(str(folder), ("ckpt.pt", "adapter.pt")) is None
    assert theirs.exists() and not ours.exists() and theirs.name not in capsys.readouterr().err
    files.let_go(str(folder))


@non_ascii_names
def test_names_with_a_process_id_write_atomic_never_writes_are_a_users_and_stay(tmp_path):
    """write_atomic names a temporary NAME.tmpPID with the id in ASCII digits, never with a 0 in front: a user's
    ckpt.pt.tmp0PID, or one with the same id in other scripts' digits (Python's int reads them), is left alone."""
    dead = dead_pid()
    users = [tmp_path / f"ckpt.pt.tmp0{dead}", tmp_path / ("ckpt.pt.tmp" + "".join(chr(0x660 + int(c))
                                                                                 for c in str(dead)))]
    for path in users:
        path.write_text("mine")
    stale = tmp_path / f"ckpt.pt.tmp{dead}"
    stale.write_text("x")
    assert files.remove_stale_temporaries(tmp_path, ("ckpt.pt",)) == [str(stale)]
    assert all(p.read_text() == "mine" for p in users)


def test_a_temporary_of_a_one_digit_process_id_is_removed_once_that_process_is_gone(tmp_path, monkeypatch):
    """In a container the ids start again at 1: a killed torchrun worker may have been process 7, and its
    ckpt.pt.tmp7 is as stale as any other once that process is gone."""
    stale = tmp_path / "ckpt.pt.tmp7"
    stale.write_text("x")
    monkeypatch.setattr(files, "process_is_running", lambda pid: False)
    assert files.remove_stale_temporaries(tmp_path, ("ckpt.pt",)) == [str(stale)] and not stale.exists()


def test_hold_opens_its_lock_file_for_writing_where_it_may_as_flock_over_nfs_needs(tmp_path, monkeypatch):
    """Over NFS, Linux takes flock's exclusive lock as a POSIX lock, which a descriptor open only for reading may not
    take (EBADF, read as a filesystem without locks: the folder not held). The read-only open is the fallback for a
    lock file this process may not write, never the first try: the folder is held against another process."""
    real_flock = files.fcntl.flock

    def nfs_flock(fd, op):
        if op & files.fcntl.LOCK_EX and files.fcntl.fcntl(fd, files.fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return real_flock(fd, op)
    monkeypatch.setattr(files.fcntl, "flock", nfs_flock)
    folder = tmp_path / "run"
    assert files.hold(str(folder)) is None
    other = subprocess.run([sys.executable, "-c", "import sys, files; print(files.hold(sys.argv[1]))", str(folder)],
                           cwd=os.path.dirname(files.__file__), capture_output=True, text=True)
    files.let_go(str(folder))
    assert other.stdout == f"process {os.getpid()}\n"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts this process's descriptors in /proc")
def test_hold_then_let_go_leaves_no_descriptor_open(tmp_path):
    """hold keeps one descriptor, on the lock file, and let_go closes it: a notebook that runs one run after
    another does not run out of descriptors."""
    before = len(os.listdir("/proc/self/fd"))
    assert files.hold(str(tmp_path / "run")) is None
    assert len(os.listdir("/proc/self/fd")) == before + 1
    files.let_go(str(tmp_path / "run"))
    assert len(os.listdir("/proc/self/fd")) == before


def test_lost_says_whether_the_lock_file_this_process_holds_a_folder_by_is_gone_or_another_by_any_path_to_it(
        tmp_path, monkeypatch):
    """lost is True once the lock file hold took is deleted, or replaced by another (a second process's new one),
    whether the folder is named by a relative or an absolute path at either end; False while it is the same file, for
    a folder never held, and once let_go let it go (nothing is held there to lose)."""
    monkeypatch.chdir(tmp_path)
    assert not files.lost("never") and not files.lost(str(tmp_path / "never"))
    for held, asked in (("rel", str(tmp_path / "rel")), (str(tmp_path / "abs"), "abs")):
        assert files.hold(held) is None
        assert not files.lost(held) and not files.lost(asked)  # its own lock file, still there
        lock = os.path.join(held, files.LOCK)
        os.remove(lock)
        assert files.lost(held) and files.lost(asked)  # deleted
        open(lock, "w").close()  # another lock file of that name: the one this process holds open is gone
        assert files.lost(held) and files.lost(asked)
        files.let_go(held)
        shutil.rmtree(held)
        assert not files.lost(held) and not files.lost(asked)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts this process's descriptors in /proc")
def test_fsync_file_closes_what_it_opens(tmp_path):
    """fsync_file runs after every write_atomic and for each file move_into moves: a descriptor it left open on each
    would run a long run (a checkpoint a step) out of descriptors."""
    (tmp_path / "f").write_text("x")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        files.fsync_file(str(tmp_path / "f"))
        files.fsync_file(str(tmp_path))
        files.fsync_file(str(tmp_path / "missing"))
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_fsync_file_of_a_named_pipe_returns_without_waiting_for_a_writer(tmp_path):
    """A named pipe opened to be read waits for a writer: fsync_file opens it non-blocking and returns."""
    import threading
    fifo = str(tmp_path / "pipe")
    os.mkfifo(fifo)
    done = threading.Thread(target=files.fsync_file, args=(fifo,), daemon=True)
    done.start()
    done.join(10)
    if done.is_alive():  # a writer lets the waiting open go, so that the thread ends
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert not done.is_alive(), "fsync_file waited for a writer of the named pipe"


@pytest.mark.skipif(sys.getfilesystemencoding() != "utf-8", reason="a name's bytes as Python gives them under UTF-8")
def test_a_name_only_python_reads_may_hold_bytes_that_are_not_utf8_text(tmp_path):
    """A Latin-1 name gives lone surrogates under UTF-8: torch and the tokenizers can not open it, so it is refused
    among `keys`, but Python itself opens it, so among `read_by_python` (data_dir, eval_dir) it passes."""
    name = os.fsdecode(b"data\xe9")  # "data\udce9"
    files.check_openable_by_torch({"out_dir": "out", "data_dir": name}, ("out_dir",), ("data_dir",))
    with pytest.raises(UserError, match="torch and the tokenizers cannot open such a path"):
        files.check_openable_by_torch({"out_dir": name, "data_dir": "data"}, ("out_dir",), ("data_dir",))


def test_ends_in_a_long_integer_only_past_the_digits_python_converts_and_never_without_a_limit():
    """Python converts an integer of up to the limit's digits (and any, with limit 0): only more is too long, and more
    text may yet make it a float's only where it ends in its digits, or in a "." or an exponent's start after them."""
    limit = sys.get_int_max_str_digits()
    cases = [("[1, " + "7" * limit, False), ("[1, " + "7" * (limit + 1), True), ("7" * (limit + 1) + ".", True),
             ("7" * (limit + 1) + "e-", True), ("7" * (limit + 1) + "E", True), ("7" * (limit + 1) + "}", False),
             ("7" * (limit + 1) + ".5", False)]
    for text, want in cases:
        assert files.ends_in_a_long_integer(text) is want, text[-3:]
    sys.set_int_max_str_digits(0)  # no limit: every integer converts
    try:
        assert not files.ends_in_a_long_integer("7" * (limit + 1))
    finally:
        sys.set_int_max_str_digits(limit)


def test_blocked_parent_names_a_read_only_filesystem_as_a_folder_that_can_not_be_written(tmp_path, monkeypatch):
    """A read-only mount refuses the trial file with EROFS, not a PermissionError: it is named, not raised."""
    def read_only_filesystem(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path))
    monkeypatch.setattr(files.tempfile, "TemporaryFile", read_only_filesystem)
    assert files.blocked_parent(str(tmp_path / "out" / "ckpt.pt")) == \
        f"{tmp_path} is not writable ({os.strerror(errno.EROFS)})"


@pytest.mark.parametrize("there", [False, True], ids=["a new folder", "a folder with an older set"])
def test_move_into_puts_each_name_on_disk_before_the_next_step_and_the_last_name_back_last(tmp_path, monkeypatch,
                                                                                           there):
    """move_into fsyncs each file before it moves, and the folder after each change of its names (the new folder's
    parent where tmp simply becomes it), so that a power cut can not leave the last name (prepare's summary.json)
    beside files not on disk: it is removed before any other is replaced and put back after them all. A file of the
    folder not among the names stays; tmp is gone."""
    tmp, folder = tmp_path / "tmp", tmp_path / "data"
    names = ["train.bin", "val.bin", "summary.json"]
    tmp.mkdir()
    for name in names:
        (tmp / name).write_text("new " + name)
    if there:
        folder.mkdir()
        for name in names + ["notes.txt"]:
            (folder / name).write_text("old " + name)
    events, real = [], {f: getattr(os, f) for f in ("rename", "replace", "remove")}
    monkeypatch.setattr(files, "fsync_file", lambda path: events.append(("fsync", os.path.normpath(path))))
    for f in real:
        monkeypatch.setattr(os, f, lambda *a, f=f: (events.append((f,) + a), real[f](*a))[1])
    files.move_into(str(tmp), str(folder), names)
    assert not tmp.exists()
    assert {name: (folder / name).read_text() for name in names} == {name: "new " + name for name in names}
    if there:
        assert (folder / "notes.txt").read_text() == "old notes.txt"
    changes = [i for i, e in enumerate(events) if e[0] != "fsync"]
    for name in names:  # each file's bytes, then tmp's names, are on disk before anything moves
        assert events.index(("fsync", str(tmp / name))) < events.index(("fsync", str(tmp))) < changes[0]
    synced, last = (str(folder) if there else str(tmp_path)), str(folder / names[-1])
    for i, j in zip(changes, changes[1:] + [len(events)]):  # the folder's names on disk before the next change
        batch = j < len(events) and events[i][0] == events[j][0] == "replace" and events[j][2] != last
        assert batch or ("fsync", synced) in events[i + 1:j], events[i:j + 1]
    if there:
        moved = [os.path.basename(e[1]) for e in events if e[0] == "replace"]
        assert events[changes[0]] == ("remove", last) and moved[-1] == names[-1]
        assert sorted(moved) == sorted(names)


def test_inside_holds_a_folder_itself_its_contents_and_links_into_it_but_not_a_sibling_sharing_its_name(tmp_path):
    """files.inside (prepare's check that no input or tokenizer lies in --out, and that no stale folder it removes holds
    one): the folder itself counts, with or without a trailing separator; a sibling whose name merely begins with the
    folder's does not; links are followed both ways."""
    out, sibling = tmp_path / "out", tmp_path / "out2"
    (out / "sub").mkdir(parents=True), sibling.mkdir()
    (tmp_path / "link").symlink_to(out / "sub")
    for path in (out, f"{out}{os.sep}", out / "sub", out / "sub" / "f.jsonl", tmp_path / "link"):
        assert files.inside(path, out) and files.inside(path, f"{out}{os.sep}"), path
    for path in (sibling, sibling / "f.jsonl", tmp_path):
        assert not files.inside(path, out), path
    assert files.inside(out / "sub", tmp_path / "link") and not files.inside(out, tmp_path / "link")
