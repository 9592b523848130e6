"""``download: true``: every paper dataset fetched from (a local stand-in for) its official URLs,
verified, resumed after a dropped connection, extracted atomically; and the failures named."""

from __future__ import annotations

import hashlib
import pickle
import socket
from pathlib import Path

import pytest

import recast.data.download as dl
from archive_server import ArchiveServer, official_files, start
from recast.data import DataError, prepare_paper_task, read_manifest
from recast.data.download import ChecksumError, DownloadError, FetchPolicy

QUICK = FetchPolicy(attempts=3, backoff_s=0.0, timeout_s=10.0)
# (train + val, test) of the fixture archives built by tests/archive_server.py
EXPECTED = {"cifar10": (40, 6), "cifar100": (20, 6), "flowers102": (6, 6), "aircraft": (8, 8),
            "indoor67": (9, 3), "cub200": (9, 3)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return official_files(tmp_path_factory.mktemp("official"))


@pytest.fixture
def server():
    state = ArchiveServer()
    httpd, thread = start(state)
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def _redirect(monkeypatch, server, files, task):
    remotes = server.redirect(dl.REMOTES, task, files[task])
    monkeypatch.setitem(dl.REMOTES, task, remotes)
    return remotes


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name.endswith((".part", ".extracting")))


@pytest.mark.parametrize("task", list(EXPECTED))
def test_every_paper_task_is_downloaded_verified_and_prepared(tmp_path, monkeypatch, server, files, task):
    remotes = _redirect(monkeypatch, server, files, task)
    raw = tmp_path / "raw"
    task_dir = prepare_paper_task(task, raw, tmp_path / "out", seed=0, image_size=16, download=True, policy=QUICK)
    counts = read_manifest(task_dir).counts
    assert (counts["train"] + counts["val"], counts["test"]) == EXPECTED[task]
    # one plain GET per official file, each kept beside the extracted layout with its digest
    assert sorted(server.requests) == sorted((r.url.split(str(server.port))[1], None) for r in remotes)
    for remote in remotes:
        kept = raw / (remote.place or remote.filename)
        assert kept.read_bytes() == files[task][remote.filename]
    assert _leftovers(raw) == []
    # a second prepare finds the layout and fetches nothing
    prepare_paper_task(task, raw, tmp_path / "out2", seed=0, image_size=16, download=True, policy=QUICK)
    assert len(server.requests) == len(remotes)


def test_connection_dropped_mid_file_resumes_with_a_range_request(tmp_path, monkeypatch, server, files, caplog):
    (remote,) = _redirect(monkeypatch, server, files, "cub200")
    path = "/records/65de6-vp158/files/CUB_200_2011.tgz"
    server.drop_once.add(path)
    size = len(files["cub200"]["CUB_200_2011.tgz"])
    assert size > 2 * server.drop_at
    task_dir = prepare_paper_task("cub200", tmp_path / "raw", tmp_path / "out", seed=0, image_size=16,
                                  download=True, policy=QUICK, progress=True)
    assert server.requests == [(path, None), (path, f"bytes={server.drop_at}-")]
    assert "resuming" in caplog.text and f"at byte {server.drop_at}" in caplog.text
    assert read_manifest(task_dir).counts["test"] == 3
    assert hashlib.md5((tmp_path / "raw" / "CUB_200_2011.tgz").read_bytes()).hexdigest() == remote.digest[4:]


def test_partial_file_of_an_earlier_run_is_resumed(tmp_path, monkeypatch, server, files):
    _redirect(monkeypatch, server, files, "indoor67")
    data = files["indoor67"]["indoorCVPR_09.tar"]
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "indoorCVPR_09.tar.part").write_bytes(data[:1000])  # a run killed mid-download
    prepare_paper_task("indoor67", raw, tmp_path / "out", seed=0, image_size=16, download=True, policy=QUICK)
    assert ("/vision/LabelMe/NewImages/indoorCVPR_09.tar", "bytes=1000-") in server.requests
    assert (raw / "indoorCVPR_09.tar").read_bytes() == data
    assert sorted(p.name for p in (raw / "indoor67").iterdir()) == [
        "Images", "TestImages.txt", "TrainImages.txt"]
    assert _leftovers(raw) == []


def test_checksum_mismatch_is_named_and_leaves_nothing(tmp_path, monkeypatch, server, files):
    (remote,) = _redirect(monkeypatch, server, files, "cub200")
    wrong = "md5:" + "0" * 32
    monkeypatch.setitem(dl.REMOTES, "cub200", (dl.Remote(remote.url, wrong),))
    raw = tmp_path / "raw"
    with pytest.raises(ChecksumError) as info:
        prepare_paper_task("cub200", raw, tmp_path / "out", seed=0, download=True, policy=QUICK)
    err = info.value
    actual = "md5:" + hashlib.md5(files["cub200"]["CUB_200_2011.tgz"]).hexdigest()
    assert (err.url, err.expected, err.actual) == (remote.url, wrong, actual)
    assert remote.url in str(err) and wrong in str(err) and actual in str(err)
    assert list(raw.iterdir()) == [] and not (tmp_path / "out").exists()
    again = pickle.loads(pickle.dumps(err))  # crosses Ray's process boundary intact
    assert (type(again), str(again), again.actual) == (ChecksumError, str(err), actual)


def test_no_network_says_where_to_place_the_archive_by_hand(tmp_path, monkeypatch, server, files):
    with socket.socket() as s:  # a port nobody listens on: connection refused, as offline
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    url = f"http://127.0.0.1:{dead}/records/65de6-vp158/files/CUB_200_2011.tgz"
    data = files["cub200"]["CUB_200_2011.tgz"]
    monkeypatch.setitem(dl.REMOTES, "cub200", (dl.Remote(url, "md5:" + hashlib.md5(data).hexdigest()),))
    raw = tmp_path / "raw"
    with pytest.raises(DownloadError) as info:
        prepare_paper_task("cub200", raw, tmp_path / "out", seed=0, download=True, policy=QUICK)
    message = str(info.value)
    assert url in message and f"place it by hand at {raw / 'CUB_200_2011.tgz'}" in message
    assert "ConnectionRefusedError" in message and isinstance(info.value, DataError)
    assert pickle.loads(pickle.dumps(info.value)).args == info.value.args
    # placed by hand where the error said: verified and extracted with no network
    (raw / "CUB_200_2011.tgz").write_bytes(data)
    task_dir = prepare_paper_task("cub200", raw, tmp_path / "out", seed=0, image_size=16, download=True, policy=QUICK)
    assert read_manifest(task_dir).counts["test"] == 3


def test_archive_that_fails_to_extract_leaves_no_half_layout(tmp_path, monkeypatch, server, files):
    good = files["cub200"]["CUB_200_2011.tgz"]
    torn = good[: len(good) // 2]  # a truncated gzip stream whose digest we publish: extraction fails midway
    _redirect(monkeypatch, server, {"cub200": {"CUB_200_2011.tgz": torn}}, "cub200")
    raw = tmp_path / "raw"
    with pytest.raises(DataError, match="cannot extract"):
        prepare_paper_task("cub200", raw, tmp_path / "out", seed=0, download=True, policy=QUICK)
    assert sorted(p.name for p in raw.iterdir()) == ["CUB_200_2011.tgz"]  # no CUB_200_2011/, no staging dir
