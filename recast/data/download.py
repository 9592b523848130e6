"""Fetching the paper's six datasets from their official archives (``prepare`` with ``download: true``).

Each task has a list of ``Remote`` files (``REMOTES``): an archive extracted under the data root,
or a plain file placed there. For each one, in order:

1. A file already at ``<data_root>/<filename>`` (downloaded earlier, or placed there by hand) is
   used when its digest matches; a mismatching one is deleted and fetched again.
2. Otherwise it is downloaded to ``<filename>.part`` with a progress bar. A dropped connection
   (or an earlier, interrupted run) resumes from the bytes already there with an HTTP ``Range``
   request; a server that ignores ``Range`` restarts the file from byte 0.
3. The digest is checked (``ChecksumError`` names the URL and both digests; the file is deleted).
4. Archives are extracted into a staging directory beside the destination and moved into place
   by ``os.replace``; a failed extraction leaves nothing behind.

No network: ``DownloadError`` names the URL and the path at which to place the file by hand.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from recast.data.errors import DataError

log = logging.getLogger(__name__)

CHUNK = 1 << 20


@dataclass(frozen=True)
class Remote:
    """One official file of a dataset.

    Attributes:
        url: where it is published.
        digest: ``"<algorithm>:<hex>"`` (md5, sha1 or sha256) as published, or None where no
            digest is published (then only the transfer's length is checked).
        extract_to: for an archive, the directory under the data root its members go into
            ("" = the data root itself); None for a plain file.
        place: for a plain file, its path under the data root.
    """

    url: str
    digest: str | None
    extract_to: str | None = ""
    place: str | None = None

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1].split("?", 1)[0]


# Digests: CIFAR and Flowers from torchvision's dataset classes; CUB-200-2011's md5 is the one
# published with the CaltechDATA record; Indoor-67's sha1 and Aircraft's sha256 are those pinned by
# other projects (the authors publish none), NOT verified here (no internet where this was written: only
# the download tests' local archives). TrainImages.txt / TestImages.txt have no digest.
REMOTES: dict[str, tuple[Remote, ...]] = {
    "cifar10": (Remote("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                       "md5:c58f30108f718f92721af3b95e74349a"),),
    "cifar100": (Remote("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                        "md5:eb9058c3a382ffc7106e4002c42a8d85"),),
    "flowers102": (
        Remote("https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz",
               "md5:52808999861908f626f3c1f4e79d11fa", extract_to="flowers-102"),
        Remote("https://www.robots.ox.ac.uk/~vgg/data/flowers/102/imagelabels.mat",
               "md5:e0620be6f572b9609742df49c70aed4d", extract_to=None, place="flowers-102/imagelabels.mat"),
        Remote("https://www.robots.ox.ac.uk/~vgg/data/flowers/102/setid.mat",
               "md5:a5357ecc9cb78c4bef273ce3793fc85c", extract_to=None, place="flowers-102/setid.mat"),
    ),
    "aircraft": (Remote("https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",
                        "sha256:e4e323d410e29f0370c81eabdcbb0e2b813acea1de22891b70b58ff41bfc9834"),),
    "indoor67": (
        Remote("http://groups.csail.mit.edu/vision/LabelMe/NewImages/indoorCVPR_09.tar",
               "sha1:0b252516e746ba428b96af408d2e8162d9b08ac5", extract_to="indoor67"),
        Remote("https://web.mit.edu/torralba/www/TrainImages.txt", None, extract_to=None,
               place="indoor67/TrainImages.txt"),
        Remote("https://web.mit.edu/torralba/www/TestImages.txt", None, extract_to=None,
               place="indoor67/TestImages.txt"),
    ),
    "cub200": (Remote("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
                      "md5:97eceeb196236b17998738112f37df78"),),
}


class ChecksumError(DataError):
    """A downloaded (or hand-placed) file's digest differs from the published one; it was deleted."""

    def __init__(self, url: str, expected: str, actual: str, path: str | os.PathLike) -> None:
        self.url, self.expected, self.actual = url, expected, actual
        super().__init__(path, f"checksum mismatch for {url}: expected {expected}, got {actual}; the file was deleted")

    def __reduce__(self):
        return type(self), (self.url, self.expected, self.actual, self.path)


class DownloadError(DataError):
    """A file could not be fetched (no network, server error); says where to place it by hand."""

    def __init__(self, url: str, reason: str, path: str | os.PathLike) -> None:
        self.url, self.reason = url, reason
        super().__init__(
            path,
            f"could not download {url} ({reason}). Without network access, fetch it elsewhere and place it "
            f"by hand at {path}; prepare then verifies and extracts it",
        )

    def __reduce__(self):
        return type(self), (self.url, self.reason, self.path)


@dataclass(frozen=True)
class FetchPolicy:
    """How hard to try: attempts per file (each resumes where the last stopped), the pause
    between them (doubling), the socket timeout."""

    attempts: int = 5
    backoff_s: float = 2.0
    timeout_s: float = 60.0


def file_digest(path: Path, algorithm: str) -> str:
    """``"<algorithm>:<hex>"`` of a file, read in 1 MiB chunks."""
    # hashlib rather than torchvision's check_integrity: that one knows md5 only, and the
    # Indoor-67 / Aircraft digests are sha1 / sha256.
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return f"{algorithm}:{h.hexdigest()}"


def _check(remote: Remote, path: Path, dest: Path) -> None:
    """Raise ``ChecksumError`` (naming ``dest``) and delete ``path`` if its digest is not the published one."""
    if remote.digest is None:
        return
    actual = file_digest(path, remote.digest.split(":", 1)[0])
    if actual != remote.digest:
        path.unlink(missing_ok=True)
        raise ChecksumError(remote.url, remote.digest, actual, dest)


class _Dropped(OSError):
    """The server closed the connection before the announced length."""


def _transfer(url: str, part: Path, timeout_s: float, progress: bool) -> None:
    """Append the rest of ``url`` to ``part`` (a Range request from its current size)."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # asked past the end: the part is complete (or stale: the digest decides)
            return
        raise
    with response:
        if have and response.status != 206:  # the server ignores Range: start over
            log.warning("%s: server ignored the Range request; downloading from byte 0", url)
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(part, "ab" if have else "wb") as out, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, desc=part.name[: -len(".part")], disable=not progress,
        ) as bar:
            while True:
                try:
                    chunk = response.read(CHUNK)
                except http.client.IncompleteRead as err:
                    out.write(err.partial)
                    raise _Dropped(f"connection dropped at byte {out.tell()}") from None
                if not chunk:
                    break
                out.write(chunk)
                bar.update(len(chunk))
            if total is not None and out.tell() < total:
                raise _Dropped(f"connection dropped at byte {out.tell()} of {total}")


def download(remote: Remote, dest: Path, policy: FetchPolicy = FetchPolicy(), progress: bool = False) -> Path:
    """Fetch ``remote`` to ``dest`` (verified), resuming a partial ``dest.part``; return ``dest``."""
    if dest.exists():
        try:
            _check(remote, dest, dest)
            return dest
        except ChecksumError as err:
            log.warning("%s; fetching it again", err)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    # A bounded loop rather than tenacity (not a dependency): each attempt resumes from the bytes
    # already in ``part``, which is the retry's whole state.
    error: Exception | None = None
    for attempt in range(policy.attempts):
        try:
            _transfer(remote.url, part, policy.timeout_s, progress)
            error = None
            break
        except (OSError, http.client.HTTPException) as err:  # URLError, timeouts, resets are OSErrors
            error = err
            if isinstance(err, urllib.error.HTTPError) and 400 <= err.code < 500:
                break  # 404, 403: retrying cannot help
            if attempt + 1 < policy.attempts:
                have = part.stat().st_size if part.exists() else 0
                log.warning("%s: attempt %d failed at byte %d (%s); resuming", remote.url, attempt + 1, have, err)
                time.sleep(policy.backoff_s * 2**attempt)
    if error is not None:
        cause = error.reason if isinstance(error, urllib.error.URLError) and not isinstance(
            error, urllib.error.HTTPError) else error  # URLError wraps the socket's error
        raise DownloadError(remote.url, f"{type(cause).__name__}: {cause}", dest)
    _check(remote, part, dest)
    os.replace(part, dest)
    return dest


def _move_into(staging: Path, target: Path) -> None:
    """Move every top-level entry of ``staging`` into ``target`` (one ``os.replace`` each)."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in sorted(staging.iterdir()):
        destination = target / entry.name
        if destination.is_dir() and entry.is_dir() and not destination.is_symlink():
            _move_into(entry, destination)  # merge (e.g. flowers-102/ already holds the .mat files)
        else:
            if destination.is_dir():
                shutil.rmtree(destination)
            os.replace(entry, destination)


def extract(archive: Path, target: Path) -> None:
    """Extract ``archive`` into ``target`` atomically: all of it appears, or none of it."""
    from torchvision.datasets.utils import extract_archive  # heavy optional import, only when extracting

    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{archive.name}.", suffix=".extracting", dir=target))
    try:
        try:
            extract_archive(str(archive), str(staging))
        except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile) as err:
            raise DataError(archive, f"cannot extract ({type(err).__name__}: {err}); delete it to fetch it again")
        _move_into(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def fetch(name: str, data_root: str | os.PathLike, policy: FetchPolicy = FetchPolicy(), progress: bool = False,
          keep_archives: bool = True) -> None:
    """Download, verify and extract every official file of task ``name`` under ``data_root``."""
    if name not in REMOTES:
        raise ValueError(f"unknown paper task {name!r}; choose from {tuple(REMOTES)}")
    root = Path(data_root)
    for remote in REMOTES[name]:
        if remote.extract_to is None:
            assert remote.place is not None, remote
            download(remote, root / remote.place, policy, progress)
            continue
        archive = download(remote, root / remote.filename, policy, progress)
        extract(archive, root / remote.extract_to if remote.extract_to else root)
        if not keep_archives:
            archive.unlink()
