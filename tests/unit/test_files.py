"""Atomic writes: a reader sees the old content or the new one, never a half-written one."""

import os

import pytest

from pose_megatron import files
from pose_megatron.files import (
    atomic_directory,
    atomic_file,
    atomic_write_text,
    exchange_paths,
    incomplete_name,
)


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_file_built_under_a_temporary_name_appears_only_when_complete(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["model.gguf"]
    with atomic_file(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".")  # hidden, same directory
        tmp.write_bytes(b"new")
        assert path.read_bytes() == b"old"
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["model.gguf"]


def test_failed_directory_build_leaves_nothing(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []


def test_directory_appears_complete_and_replaces_only_when_asked(tmp_path):
    final = tmp_path / "out"
    with atomic_directory(final) as tmp:
        assert tmp != final and not final.exists()
        (tmp / "v").write_text("1")
    assert (final / "v").read_text() == "1"
    with pytest.raises(FileExistsError):
        with atomic_directory(final):
            pass
    with atomic_directory(final, replace=True) as tmp:
        (tmp / "v").write_text("2")
    assert (final / "v").read_text() == "2" and os.listdir(tmp_path) == ["out"]


def _final_never_absent(monkeypatch, final):
    """Every rename atomic_directory makes is checked: `final` must exist after each."""
    real = os.replace

    def checked(src, dst):
        real(src, dst)
        assert final.exists(), f"{final} was absent after renaming {src} -> {dst}"

    monkeypatch.setattr(files.os, "replace", checked)


def test_a_replace_is_one_exchange_where_the_file_system_allows(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "v").write_text("a")
    if not exchange_paths(a, b):
        pytest.skip(f"the file system of {tmp_path} cannot exchange paths; "
                    "test_a_replace_without_exchange_still_completes covers the fallback")
    assert (b / "v").read_text() == "a" and not (a / "v").exists()
    final = tmp_path / "out"
    with atomic_directory(final) as tmp:
        (tmp / "v").write_text("1")
    _final_never_absent(monkeypatch, final)
    with atomic_directory(final, replace=True) as tmp:
        (tmp / "v").write_text("2")
    assert (final / "v").read_text() == "2"
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "out"]  # the old copy is gone


def test_a_replace_without_exchange_still_completes(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "exchange_paths", lambda a, b: False)
    final = tmp_path / "out"
    with atomic_directory(final) as tmp:
        (tmp / "v").write_text("1")
    with atomic_directory(final, replace=True) as tmp:
        (tmp / "v").write_text("2")
    assert (final / "v").read_text() == "2" and os.listdir(tmp_path) == ["out"]


def test_exchange_of_a_missing_path_is_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(FileNotFoundError):
        exchange_paths(tmp_path / "a", tmp_path / "missing")


def test_leftover_of_a_killed_build_is_removed(tmp_path):
    final = tmp_path / "out"
    incomplete_name(final).mkdir()
    (incomplete_name(final) / "stale").write_text("x")
    with atomic_directory(final) as tmp:
        assert list(tmp.iterdir()) == []


def test_concurrent_writer_that_loses_the_race_is_told(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(FileExistsError, match="another writer"):
        with atomic_directory(final, concurrent=True) as tmp:
            (tmp / "mine").write_text("x")
            final.mkdir()  # the other writer finishes first
            (final / "theirs").write_text("y")
    assert os.listdir(final) == ["theirs"] and os.listdir(tmp_path) == ["out"]
