"""The paper configuration end to end at micro scale: ``configs/paper.yaml`` with only its sizes
cut down (32 px, narrow widths, one seed, a few examples, one epoch, a few mimicry steps), on
fixture datasets in all six official layouts and random-init local checkpoints
(``checkpoint_file``) of ViT-S (12 blocks, width 48) and ResNet-34 (3-4-6-3 blocks, widths
8-64): the depths, hence the RECAST plans and coefficient counts, of the paper's backbones. Every stage runs as ``python -m stages.<stage>`` in a fresh copy of the
source tree, with a real local Ray and an sqlite MLflow store.

``RECAST_MICRO_DEVICE`` (default cpu) selects ``runtime.device``; ``RECAST_MICRO_KEEP`` names a
folder to copy the metrics and the report into (benchmarks/gpu_check.sh uses both).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import yaml
from paper_layouts import write_paper_layouts
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[2]
PAPER_ORDER = ["flowers102", "aircraft", "indoor67", "cifar100", "cifar10", "cub200"]  # configs/paper.yaml
STAGES = ["prepare", "pretrain", "mimic", "tune", "combine", "evaluate"]
SIZE = 32
NARROW = {"vit": {"img_size": SIZE, "embed_dim": 48, "num_heads": 2},
          "resnet": {"channels": [8, 16, 32, 64], "stem_width": 8}}


def micro_params(root: Path, device: str) -> dict:
    """configs/paper.yaml with the sizes cut down and paths inside ``root``; structure unchanged."""
    p = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())
    # pretrain, mimic and the loading check have 2 jobs each (one per arch), seconds at this size:
    # in-process, without a local Ray start each; tune and combine still fan out through Ray
    p["runtime"].update(num_cpus=2, cpus_per_task=1, torch_threads=1, gpus_per_task=1 if device == "cuda" else 0, device=device,
                        experiment="paper-micro", progress=False, inline_jobs=2)
    p["prepare"].update(data_root=str(root / "raw"), image_size=SIZE, val_fraction=0.4)
    p["pretrain"].update(image_size=SIZE)
    for arch, a in p["pretrain"]["archs"].items():
        a["checkpoint_file"] = f"weights/{arch}.safetensors"
        a["kwargs"] = NARROW[arch]
    for a in p["mimic"]["archs"].values():
        a["mimicry"].update(steps=3, step_size=2)
        for ablation in a.get("ablations", {}).values():  # the same rows, a few steps each
            if "steps" in ablation:
                ablation["steps"] = 3
            if "step_size" in ablation:
                ablation["step_size"] = 2
    p["mimic"].update(image_size=SIZE, feature_batch=4, eval_limit=8)
    p["tune"]["seeds"] = [42]
    p["tune"]["train"].update(epochs=1, step_size=1, batch_size=8, image_size=SIZE, limit_train=8, limit_eval=8)
    return p


def write_checkpoints(root: Path, params: dict) -> None:
    """A random-init checkpoint per arch at ``pretrain.archs.<arch>.checkpoint_file``."""
    torch.manual_seed(0)
    for a in params["pretrain"]["archs"].values():
        model = timm.create_model(a["model"], pretrained=False, **a["kwargs"])
        path = root / a["checkpoint_file"]
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory, source_tree):
    root = source_tree(tmp_path_factory.mktemp("paper"))
    device = os.environ.get("RECAST_MICRO_DEVICE", "cpu")
    params = micro_params(root, device)
    write_paper_layouts(root / "raw")
    write_checkpoints(root, params)
    (root / "micro.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RECAST_PARAMS")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}", TQDM_DISABLE="1", RAY_USAGE_STATS_ENABLED="0",
               MLFLOW_DISABLE_TELEMETRY="true")
    seconds = {}
    for stage in STAGES:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", f"stages.{stage}", "--params", "micro.yaml"], cwd=root, env=env,
                              capture_output=True, text=True, timeout=900, check=False)
        seconds[stage] = round(time.perf_counter() - start, 1)
        print(f"stages.{stage}: {seconds[stage]} s", file=sys.stderr, flush=True)
        assert proc.returncode == 0, f"stages.{stage} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    print(f"\npaper micro run ({device}) seconds per stage: {seconds}")
    keep = os.environ.get("RECAST_MICRO_KEEP")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for rel in ("metrics", "reports/report.md"):
            src = root / rel
            (shutil.copytree(src, Path(keep) / rel, dirs_exist_ok=True) if src.is_dir()
             else shutil.copy2(src, Path(keep) / src.name))
        (Path(keep) / "seconds.json").write_text(json.dumps({"device": device, "seconds": seconds}, indent=1))
    return root, params


def _stored_bytes(path: Path) -> int:
    """Bytes of the tensor data in a safetensors file: its size minus the 8-byte length and header."""
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    return len(raw) - 8 - header_len


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_paper_path_task_order_counts_and_bytes(paper_run):
    root, params = paper_run
    suite = json.loads((root / "data/prepared/paper/suite.json").read_text())
    assert suite["tasks"] == PAPER_ORDER
    md = (root / "reports/report.md").read_text()
    lines = md.splitlines()
    for arch in ("vit", "resnet"):
        start = next(i for i, line in enumerate(lines) if line.startswith(f"## {arch}: task-wise test accuracy (%)"))
        header = lines[start + 2]
        assert [c.strip() for c in header.strip("|").split("|")][1:7] == PAPER_ORDER, header
        # RECAST trained task after task: its matrix printed once, as a continual method's
        assert f"## {arch}/recast_sequential: accuracy matrix (%), mean over seeds" in md
        assert f"## {arch}: loading check" in md
    assert "nan" not in md
    evaluate_rows = [json.loads(p.read_text())["record"]["metrics"]
                     for p in (root / "outputs/.jobcache/reload").glob("*.json")]
    assert sorted(r["tasks"] == PAPER_ORDER for r in evaluate_rows) == [True, True]
    rows = json.loads((root / "outputs/tune/results.json").read_text())
    # runtime.inline_jobs=2: each arch's pretrain job ran in its stage's process; tune fanned out on Ray
    pretrained = [json.loads(p.read_text())["record"]["metrics"]
                  for p in (root / "outputs/.jobcache/pretrain").glob("*.json") if not p.name.endswith(".mlflow.json")]
    assert len(pretrained) == 2 and not any(m["ray_node"] for m in pretrained)
    assert len(rows) > 2 and all(r["ray_node"] for r in rows)
    seq = [r for r in rows if r.get("sequential")]
    assert {r["method"] for r in seq} == {"l2p", "inflora", "ewc", "lwf", "gdumb", "er_ace", "derpp", "hat", "recast"}
    assert all(r["task_names"] == PAPER_ORDER for r in seq)

    # every method of configs/paper.yaml ran on every task; its result rows are in the paper's order
    # (metrics/*.json maps are written with sorted keys, for reproducible bytes)
    tune = json.loads((root / "metrics/tune.json").read_text())
    combine = json.loads((root / "metrics/combine.json").read_text())
    for stage, summary in (("tune", tune), ("combine", combine)):
        stage_rows = [r for r in json.loads((root / f"outputs/{stage}/results.json").read_text())
                      if not r.get("sequential")]
        for name, m in params[stage]["methods"].items():
            for arch in m.get("archs") or params["tune"]["archs"]:
                assert sorted(summary[f"{arch}/{name}"]["test_acc"]) == sorted(PAPER_ORDER), (stage, arch, name)
                order = [r["task"] for r in stage_rows if r["arch"] == arch and r["method"] == name]
                assert order == PAPER_ORDER, (stage, arch, name, order)

    # per-task parameters as the paper counts them: coefficients apart from the head
    assert tune["vit/recast"]["task_params"] == 96 and tune["resnet/recast"]["task_params"] == 168
    pretrain = {a: json.loads((root / f"outputs/pretrain/{a}.json").read_text()) for a in ("vit", "resnet")}
    assert pretrain["vit"]["checkpoint_file"].endswith("weights/vit.safetensors")
    assert pretrain["vit"]["timm_tag"] and pretrain["resnet"]["timm_tag"]
    cells = {c.strip() for line in lines if line.startswith("|") for c in line.strip("|").split("|")}
    assert {"recast", "96", "168"} <= cells
    # the mimicry ablations beside the main reconstruction, the VAE ones included (the quick default
    # params.yaml has only the gradient one); RECAST trains fewer parameters than the tiny LoRA
    assert {"vit (closed_form)", "vit (vae_mse)", "vit (vae_smooth_l1)", "resnet (closed_form)"} <= cells
    report = json.loads((root / "metrics/report.json").read_text())
    assert report["params"]["vit"]["rc"] < report["params"]["vit"]["lora_tiny"]

    # payload bytes are the bytes each method really stores
    width = {"vit": 48, "resnet": 64}
    resnet = timm.create_model(params["pretrain"]["archs"]["resnet"]["model"], **NARROW["resnet"])  # Piggyback masks every conv of layer1..4
    convs = [m for n, m in resnet.named_modules() if isinstance(m, torch.nn.Conv2d) and n.startswith("layer")]
    # 32 convs of 16 blocks + the downsample projections: 3 in ResNet-34; 4 here, since the narrow
    # layer1 (8 channels) follows timm's fixed 64-channel stem
    assert len(convs) == 32 + 4
    resnet_stage_weights = sum(m.weight.numel() for m in convs)
    payloads = sorted((root / "outputs").glob("*/payloads/*/*/*.safetensors"))
    assert len(payloads) == 6 * (3 + 2 + 3 + 9 + 4)  # tasks x (vit tune 5, resnet tune 3, combine 9 + 4)
    for path in payloads:
        side = json.loads(path.with_suffix(".json").read_text())
        tensors = load_file(str(path))
        assert side["bytes"] == _stored_bytes(path) == sum(t.numel() * t.element_size() for t in tensors.values())
        head = (side["num_classes"] * width[side["arch"]] + side["num_classes"]) * 4
        if side["method"] == "recast":
            assert side["bytes"] == (96 if side["arch"] == "vit" else 168) * 4 + head
        if side["method"].startswith("piggyback"):
            bits = {k: t for k, t in tensors.items() if k.endswith(".mask_bits")}
            assert all(t.dtype == torch.uint8 for t in bits.values()) and len(bits) == len(convs)
            assert sum(t.numel() for t in bits.values()) == resnet_stage_weights // 8

    # each payload (and pretrained state) is stored once: outputs, job cache and MLflow share the file
    cached = {p.stat().st_ino for p in (root / "outputs/.jobcache").glob("*/*.safetensors")}
    published = payloads + sorted((root / "outputs/pretrain").glob("*.safetensors"))
    assert all(p.stat().st_ino in cached for p in published)
    logged = sorted((root / "mlartifacts").rglob("*.safetensors"))
    assert len(logged) == len(payloads) and {p.stat().st_ino for p in logged} == {p.stat().st_ino for p in payloads}

    # mimicry quality on the tasks' own images
    mimic = json.loads((root / "metrics/mimic.json").read_text())
    for arch in ("vit", "resnet"):
        assert 0.0 <= mimic[arch]["top1_agreement"] <= 1.0 and -1.0 <= mimic[arch]["penultimate_cosine"] <= 1.0
        report = json.loads((root / f"outputs/mimic/{arch}/report.json").read_text())
        assert sorted(report["task_agreement"]) == sorted(PAPER_ORDER)  # a JSON map, written with sorted keys
        tests = {t: json.loads((root / f"data/prepared/paper/{t}/manifest.json").read_text())["counts"]["test"]
                 for t in PAPER_ORDER}
        assert {t: v["images"] for t, v in report["task_agreement"].items()} == {t: min(8, n) for t, n in tests.items()}
