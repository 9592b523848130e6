"""recast.atomic: the one temp-then-rename writer (local and pyarrow.fs)."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest

from recast.atomic import temp_path, write_atomic, write_atomic_fs


class Boom(Exception):
    pass


def test_temp_names_are_unique_per_writer_and_beside_the_target(tmp_path):
    names = {temp_path(tmp_path / "a.json") for _ in range(200)}
    assert len(names) == 200 and all(n.parent == tmp_path and n.name.startswith("a.json.") for n in names)


def test_write_is_all_or_nothing(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "m.json"
    write_atomic(target, "old\n")
    assert target.read_text() == "old\n"

    def fail(src, dst):
        raise Boom("disk full")

    monkeypatch.setattr("recast.atomic.os.replace", fail)
    with pytest.raises(Boom):
        write_atomic(target, b"new")
    assert target.read_text() == "old\n" and sorted(p.name for p in target.parent.iterdir()) == ["m.json"]


def test_fs_write_moves_the_whole_file_and_cleans_up(tmp_path):
    fs = pafs.LocalFileSystem()
    dest = f"{tmp_path}/x.bin"
    write_atomic_fs(fs, dest, b"abc")
    assert (tmp_path / "x.bin").read_bytes() == b"abc"

    class FailingMove:  # a filesystem whose rename fails after the temp file was written
        def __getattr__(self, name):
            return getattr(fs, name)

        def move(self, src, dst):
            raise Boom("network")

    with pytest.raises(Boom):
        write_atomic_fs(FailingMove(), dest, b"defg")
    assert (tmp_path / "x.bin").read_bytes() == b"abc" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]
