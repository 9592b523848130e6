"""Fault injection helpers of the reliability suite: byte flips, tiny stage files written by the
stages' own writers (no training), a real ``mlflow server`` started and stopped by pid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import timm
import torch

import recast
from helpers import free_port
from recast.io import save_tensors, tensors_sha256
from stages.config.params import MimicArch
from stages.jobs.backbones import save_mimicked, save_pretrained

REPO = Path(__file__).resolve().parents[2]
VIT = {"model": "test_vit", "kwargs": {"img_size": 32, "patch_size": 8, "global_pool": "avg"}}
TASKS = ("task_a", "task_b")


def flip_byte(path: Path, offset: int = -1) -> None:
    """XOR one byte of ``path`` (default: the last one, inside the tensor data)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def write_stage_files(root: Path) -> Path:
    """``<root>/outputs/{pretrain,mimic,tune}`` and ``data/prepared/offline/<task>/manifest.json``
    as the stages write them: a tiny ViT, its RECAST banks (applied, not mimicked), a payload per task."""
    torch.manual_seed(0)
    model = timm.create_model(VIT["model"], pretrained=False, num_classes=10, **VIT["kwargs"]).eval()
    save_pretrained(root / "outputs/pretrain", "vit", model.state_dict(),
                    {**VIT, "num_classes": 10, "source": "train"})
    cfg = MimicArch(preset="recast_att_mlp", overrides={"groups": 3}).recast_config()
    rc = recast.apply(model, cfg, seed=0)
    banks = {k: b.templates.detach() for k, b in rc.banks.items()}
    base = rc.task_tensors(cfg.base_task)
    bank_sha = save_mimicked(root / "outputs/mimic", "vit", cfg, 0, banks, base)
    for i, task in enumerate(TASKS):
        payload = {k: v + 0.01 * i for k, v in base.items()}  # coefficients + a 10-class head
        side = {"kind": "recast-payload", "task": task, "bank_sha256": bank_sha,
                "payload_sha256": tensors_sha256(payload)}
        save_tensors(payload, side, root / "outputs/tune/payloads/vit/recast" / f"{task}-s42")
        task_dir = root / "data/prepared/offline" / task
        task_dir.mkdir(parents=True)
        (task_dir / "manifest.json").write_text(json.dumps({"task": task, "num_classes": 5}))
    (root / "data/prepared/offline/source").mkdir(parents=True)
    (root / "data/prepared/offline/source/manifest.json").write_text(json.dumps({"task": "source"}))
    return root


class MlflowServer:
    """``mlflow server`` on 127.0.0.1:<port> with a sqlite store under ``root``; start/stop by pid."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 300) -> None:
        cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "mlartifacts"), "--workers", "1"]
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=subprocess.DEVNULL,
                                     stderr=open(self.root / "server.log", "a"), start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # SIGKILL, the server and its uvicorn/gunicorn workers at once: an outage. On SIGTERM
            # uvicorn shuts down gracefully, serving open keep-alive connections for seconds more
            # (8 s in one CI run: a stage finished through it and the outage never happened)
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None


