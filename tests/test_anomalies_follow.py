"""Following a log file like tail -F (anomalies plugin), with real files: rotation, truncation, confinement."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
from nexus.handlers.anomalies.follow import FileFollower, PathNotAllowed, resolve_log_path


def append(path: Path, text: str) -> None:
    with path.open("a", encoding="utf-8") as file:
        file.write(text)


def follower(log_dir: Path, name: str = "app.log", *, from_start: bool = False, max_line_bytes: int = 65536) -> Any:
    followed = FileFollower(log_dir, name, from_start=from_start, max_line_bytes=max_line_bytes)
    followed.open()
    return followed


def test_appended_lines_are_read_and_a_partial_line_waits_for_its_newline(tmp_path: Path) -> None:
    """Only lines written after open() arrive; an unterminated line is held until its newline; CRLF is trimmed."""
    log = tmp_path / "app.log"
    log.write_text("old line\n")
    tail = follower(tmp_path)
    assert tail.poll() == []
    append(log, "one\ntwo\r\nthr")
    assert tail.poll() == ["one", "two"]
    assert tail.poll() == []
    append(log, "ee\n\n")
    assert tail.poll() == ["three", ""]
    tail.close()


def test_from_start_reads_what_the_file_already_holds(tmp_path: Path) -> None:
    """With from_start the existing lines come first."""
    (tmp_path / "app.log").write_text("a\nb\n")
    tail = follower(tmp_path, from_start=True)
    assert tail.poll() == ["a", "b"]
    tail.close()


def test_rotation_by_rename_reads_the_rest_of_the_old_file_then_the_new_one(tmp_path: Path) -> None:
    """mv app.log app.log.1 and a new app.log: the old file's last lines, its unterminated tail, then the new file."""
    log = tmp_path / "app.log"
    log.write_text("")
    tail = follower(tmp_path)
    append(log, "before\n")
    assert tail.poll() == ["before"]
    append(log, "late write\nunterminated")
    log.rename(tmp_path / "app.log.1")
    assert tail.poll() == ["late write"]  # the name is gone: keep reading the old file
    append(tmp_path / "app.log.1", " tail\n")  # the writer still has the old file open
    assert tail.poll() == ["unterminated tail"]
    log.write_text("new 1\nnew 2\n")
    assert tail.poll() == ["new 1", "new 2"]
    assert tail.rotations == 1
    append(log, "new 3\n")
    assert tail.poll() == ["new 3"]
    tail.close()


def test_rotation_flushes_a_line_the_old_file_never_finished(tmp_path: Path) -> None:
    """An unterminated last line of a rotated file is delivered once the new file takes over."""
    log = tmp_path / "app.log"
    log.write_text("")
    tail = follower(tmp_path)
    append(log, "complete\ncut off")
    os.replace(log, tmp_path / "app.log.1")
    log.write_text("fresh\n")
    assert tail.poll() == ["complete", "cut off", "fresh"]
    tail.close()


def test_truncation_restarts_at_the_start_of_the_file(tmp_path: Path) -> None:
    """copytruncate: when the file shrinks below the position read, reading restarts at its start."""
    log = tmp_path / "app.log"
    log.write_text("")
    tail = follower(tmp_path)
    append(log, "first line that is long\nsecond line that is long\n")
    assert tail.poll() == ["first line that is long", "second line that is long"]
    with log.open("r+") as file:
        file.truncate(0)
    append(log, "after\n")
    assert tail.poll() == ["after"]
    assert (tail.truncations, tail.rotations) == (1, 0)
    append(log, "more\n")
    assert tail.poll() == ["more"]
    tail.close()


def test_a_repointed_symbolic_link_is_a_rotation(tmp_path: Path) -> None:
    """Following current.log -> a.log, re-pointing the link to b.log switches to b.log after draining a.log."""
    (tmp_path / "a.log").write_text("")
    (tmp_path / "b.log").write_text("b1\n")
    link = tmp_path / "current.log"
    link.symlink_to("a.log")
    tail = follower(tmp_path, "current.log")
    append(tmp_path / "a.log", "a1\n")
    assert tail.poll() == ["a1"]
    append(tmp_path / "a.log", "a2\n")
    link.unlink()
    link.symlink_to("b.log")
    assert tail.poll() == ["a2", "b1"]
    assert tail.relative_path == "b.log"
    tail.close()


def test_long_lines_are_cut_at_max_line_bytes(tmp_path: Path) -> None:
    """A line longer than max_line_bytes arrives cut to that length; the rest of it is skipped."""
    log = tmp_path / "app.log"
    log.write_text("")
    tail = follower(tmp_path, max_line_bytes=8)
    append(log, "0123456789abcdef\nshort\n")
    assert tail.poll() == ["01234567", "short"]
    append(log, "0123")
    assert tail.poll() == []
    append(log, "456789")  # crosses the limit in a later chunk
    assert tail.poll() == ["01234567"]
    append(log, "zz\nok\n")
    assert tail.poll() == ["ok"]
    tail.close()


def test_invalid_utf8_is_replaced_not_fatal(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 become replacement characters."""
    log = tmp_path / "app.log"
    log.write_bytes(b"")
    tail = follower(tmp_path)
    with log.open("ab") as file:
        file.write(b"bad \xff byte\n")
    assert tail.poll() == ["bad \ufffd byte"]
    tail.close()


def test_paths_outside_the_log_directory_are_refused(tmp_path: Path) -> None:
    """'..', absolute paths elsewhere, links leading out and the directory itself are all refused."""
    logs = tmp_path / "logs"
    logs.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("password\n")
    (logs / "escape.log").symlink_to(secret)
    (logs / "sub").mkdir()
    (logs / "sub" / "ok.log").write_text("")
    for path in ("../secret.txt", str(secret), "escape.log", "sub/../../secret.txt", ".", str(logs), "/etc/passwd"):
        with pytest.raises(PathNotAllowed, match="outside the log directory"):
            resolve_log_path(logs, path)
    with pytest.raises(PathNotAllowed, match="NUL"):
        resolve_log_path(logs, "a\x00b")
    named, target = resolve_log_path(logs, "sub/../sub/ok.log")
    assert target == (logs / "sub" / "ok.log").resolve()
    assert resolve_log_path(logs, str(logs / "sub" / "ok.log"))[1] == target
    assert named == logs.resolve() / "sub/../sub/ok.log"


def test_a_rotation_onto_a_link_leading_outside_is_refused(tmp_path: Path) -> None:
    """When the followed name is replaced by a link out of the log directory, the next poll refuses it."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (tmp_path / "secret.txt").write_text("password\n")
    log = logs / "app.log"
    log.write_text("")
    tail = follower(logs)
    log.unlink()
    log.symlink_to(tmp_path / "secret.txt")
    with pytest.raises(PathNotAllowed, match="outside the log directory"):
        tail.poll()
    tail.close()


def test_only_regular_files_are_followed(tmp_path: Path) -> None:
    """A FIFO or a directory in the log directory cannot be followed (and opening never blocks)."""
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(PathNotAllowed, match="not a regular file"):
        follower(tmp_path, "pipe")
    (tmp_path / "dir").mkdir()
    with pytest.raises((PathNotAllowed, IsADirectoryError)):
        follower(tmp_path, "dir")
    with pytest.raises(FileNotFoundError):
        follower(tmp_path, "missing.log")


def test_close_while_a_poll_runs_in_another_thread_is_safe(tmp_path: Path) -> None:
    """close() during a poll defers to the poll, which closes the file; later polls return nothing."""
    log = tmp_path / "app.log"
    log.write_text("")
    tail = follower(tmp_path)
    append(log, "x\n")
    holding = threading.Event()
    release = threading.Event()
    original = tail._read

    def slow_read() -> list[str]:
        holding.set()
        release.wait(5)
        lines: list[str] = original()
        return lines

    tail._read = slow_read
    worker = threading.Thread(target=lambda: result.extend(tail.poll()))
    result: list[str] = []
    worker.start()
    assert holding.wait(5)
    tail.close()  # the poll holds the file: closing is deferred to it
    release.set()
    worker.join(5)
    assert result == ["x"]
    append(log, "y\n")
    assert tail.poll() == []


def test_a_follower_closed_before_it_opens_never_opens(tmp_path: Path) -> None:
    """close() before open() (a stream cancelled while opening) leaves no file open and polls return nothing."""
    (tmp_path / "app.log").write_text("a\n")
    tail = FileFollower(tmp_path, "app.log", from_start=True)
    tail.close()
    tail.open()
    assert tail.poll() == []
    assert tail._fd is None
