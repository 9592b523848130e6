"""A local HTTP server on 127.0.0.1 serving the paper datasets' official files, built small from
the fixture writers of tests/paper_layouts.py, with the faults a real download meets: a connection
dropped mid-file (once), Range requests (resume), and a record of every request."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

from paper_layouts import (
    cifar_records,
    write_aircraft,
    write_cifar10_py,
    write_cifar100_py,
    write_cub,
    write_flowers,
    write_indoor,
)


def _tar(source: Path, arcname: str, gz: bool) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gz else "w") as tar:
        tar.add(source, arcname=arcname)
    return buffer.getvalue()


def official_files(work: Path) -> dict[str, dict[str, bytes]]:
    """task -> {official file name: bytes}, each archive in its dataset's official layout."""
    c10 = {f"data_batch_{i}": cifar_records(8, 10, i) for i in range(1, 6)} | {"test_batch": cifar_records(6, 10, 9)}
    c100 = {"train": cifar_records(20, 100, 11), "test": cifar_records(6, 100, 12)}
    flowers, aircraft = write_flowers(work), write_aircraft(work).parent
    indoor, cub = write_indoor(work), write_cub(work)
    return {
        "cifar10": {"cifar-10-python.tar.gz": _tar(write_cifar10_py(work, c10), "cifar-10-batches-py", True)},
        "cifar100": {"cifar-100-python.tar.gz": _tar(write_cifar100_py(work, c100), "cifar-100-python", True)},
        "flowers102": {"102flowers.tgz": _tar(flowers / "jpg", "jpg", True),
                       "imagelabels.mat": (flowers / "imagelabels.mat").read_bytes(),
                       "setid.mat": (flowers / "setid.mat").read_bytes()},
        "aircraft": {"fgvc-aircraft-2013b.tar.gz": _tar(aircraft, "fgvc-aircraft-2013b", True)},
        "indoor67": {"indoorCVPR_09.tar": _tar(indoor / "Images", "Images", False),  # the official tar: Images/ at top
                     "TrainImages.txt": (indoor / "TrainImages.txt").read_bytes(),
                     "TestImages.txt": (indoor / "TestImages.txt").read_bytes()},
        "cub200": {"CUB_200_2011.tgz": _tar(cub, "CUB_200_2011", True)},
    }


@dataclass
class ArchiveServer:
    """What the handler serves and what it saw. ``drop_once``: paths whose first GET sends the
    full Content-Length but only ``drop_at`` bytes, then closes the connection."""

    files: dict[str, bytes] = field(default_factory=dict)
    drop_once: set[str] = field(default_factory=set)
    drop_at: int = 300
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    port: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def redirect(self, remotes: dict, task: str, files: dict[str, bytes]) -> tuple:
        """Serve ``files`` under the paths of ``task``'s official URLs; return its remotes pointed
        here, each with the digest (same algorithm as the official one) of the bytes served."""
        out = []
        for remote in remotes[task]:
            path = urlparse(remote.url).path
            data = files[remote.filename]
            self.files[path] = data
            digest = None
            if remote.digest is not None:
                algorithm = remote.digest.split(":")[0]
                digest = f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
            out.append(replace(remote, url=self.url(path), digest=digest))
        return tuple(out)


def make_handler(state: ArchiveServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = urlparse(self.path).path
            wanted = self.headers.get("Range")
            state.requests.append((path, wanted))
            data = state.files.get(path)
            if data is None:
                self.send_error(404)
                return
            start = int(wanted.removeprefix("bytes=").split("-")[0]) if wanted else 0
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206 if wanted else 200)
            if wanted:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            if path in state.drop_once:
                state.drop_once.discard(path)
                self.wfile.write(data[start:start + state.drop_at])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(data[start:])

    return Handler


def start(state: ArchiveServer) -> tuple[ThreadingHTTPServer, threading.Thread]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, thread
