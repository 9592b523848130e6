"""Stage ``evaluate``: the report.

- Forgetting, measured: for each architecture, every task's RECAST payload is loaded, in task
  order, into ONE RecastModel on the shared banks, and every earlier task is re-evaluated after
  each addition (task identity is known, so this must stay exactly unchanged). One Ray job per
  architecture (``stages.fanout.run_jobs``), on ``runtime.device``.
- A task-wise accuracy table per architecture (Tables 1/2 style) with average accuracy,
  forgetting, trainable parameters and bytes per task, and wall time.
- ``metrics/report.json`` for ``dvc metrics show``; ``reports/params_vs_acc.png`` for
  ``dvc plots``; ``reports/report.md``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from recast.baselines.results import forgetting_per_task  # noqa: E402
from recast.data import BatchLoader  # noqa: E402
from recast.training import evaluate  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from stages.backbones import load_backbone  # noqa: E402
from stages.cli import entry, stage_params  # noqa: E402
from stages.common import resolve, validate_section, write_json_atomic  # noqa: E402
from stages.fanout import run_jobs  # noqa: E402
from stages.params import CombineParams, EvaluateParams, RuntimeParams, TuneParams  # noqa: E402
from stages.runtime import pick_device  # noqa: E402
from stages.specs import task_names  # noqa: E402
from stages.tracking import Tracker  # noqa: E402


def forgetting_spec(arch: str, tune_dir: Path, results: list[dict], p_tune: TuneParams, device: str,
                    method: str = "recast") -> dict[str, Any] | None:
    """The job spec of ``forgetting_job`` for ``arch`` (None when it has no ``method`` payloads)."""
    order = {t: i for i, t in enumerate(task_names(p_tune))}
    seed = p_tune.seeds[0]
    rows = sorted((r for r in results if r["arch"] == arch and r["method"] == method and r["seed"] == seed),
                  key=lambda r: order.get(r["task"], len(order)))
    if not rows:
        return None
    payloads = [str(tune_dir / "payloads" / arch / method / f"{r['task']}-s{seed}.safetensors") for r in rows]
    shas = [json.loads(Path(f).with_suffix(".json").read_text()).get("payload_sha256", "") for f in payloads]
    return {"id": f"forgetting/{arch}/{method}", "arch": arch, "device": device,
            "tasks": [r["task"] for r in rows], "num_classes": [r["num_classes"] for r in rows],
            "standalone": [r["test_acc"] for r in rows], "payloads": payloads, "payload_sha256": shas,
            "pretrain_dir": str(resolve(p_tune.pretrain_dir)), "mimic_dir": str(resolve(p_tune.mimic_dir)),
            "data_dir": str(resolve(p_tune.data_dir)), "image_size": p_tune.train.image_size,
            "limit_eval": p_tune.train.limit_eval}


def forgetting_job(spec: dict) -> tuple[dict, dict]:
    """Ray task: load every task's RECAST payload, in task order, into ONE model on the shared
    banks (on ``spec["device"]``) and re-evaluate every earlier task after each addition."""
    device = spec["device"]
    rc = load_backbone(spec["arch"], Path(spec["pretrain_dir"]), Path(spec["mimic_dir"])).recast().to(device)
    tasks, data = spec["tasks"], Path(spec["data_dir"])
    matrix: list[list[float | None]] = []
    for i, (task, payload) in enumerate(zip(tasks, spec["payloads"])):
        tensors = load_file(payload, device=device)
        rc.load_task_tensors(task, {k: v for k, v in tensors.items() if not k.startswith("extra.")},
                             num_classes=spec["num_classes"][i])
        row: list[float | None] = []
        for j, prev in enumerate(tasks):
            if j > i:
                row.append(None)
                continue
            rc.set_task(prev, freeze=False)
            row.append(evaluate(rc, BatchLoader(data / prev, "test", 256, spec["image_size"], train=False, seed=0,
                                                limit=spec["limit_eval"], device=device), device))
        matrix.append(row)
    final = matrix[-1]
    forgetting = [f for f in forgetting_per_task(matrix) if f is not None]
    return {"tasks": tasks, "acc_matrix": matrix, "device": device,
            "avg_forgetting": statistics.mean(forgetting) if forgetting else 0.0,
            "max_abs_diff_vs_standalone": max(abs(a - b) for a, b in zip(final, spec["standalone"]))}, {}


def recast_forgetting(archs: list[str], tune_dir: Path, results: list[dict], p_tune: TuneParams,
                      rt: RuntimeParams, method: str = "recast") -> dict[str, dict[str, Any]]:
    """``forgetting_job`` for each arch with payloads, as Ray jobs (``stages.fanout.run_jobs``)."""
    device = pick_device(rt.device)
    specs = [s for arch in archs if (s := forgetting_spec(arch, tune_dir, results, p_tune, device, method))]
    done = run_jobs("forgetting", forgetting_job, specs, rt)
    return {s["arch"]: {k: v for k, v in done[s["id"]][0].items() if not k.startswith("_")} for s in specs}


def plot_params_vs_acc(summary: dict[str, dict], path: Path) -> None:
    archs = sorted({k.split("/")[0] for k in summary})
    fig, axes = plt.subplots(1, len(archs), figsize=(5.5 * len(archs), 4.2), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        for key, v in sorted(summary.items()):
            a, method = key.split("/", 1)
            if a != arch or "avg_test_acc" not in v:
                continue
            x = v.get("trainable_params") or v.get("trainable_params_per_task") or 1
            x = statistics.mean(x) if isinstance(x, list) else x
            ax.scatter([x], [100 * v["avg_test_acc"]], s=40)
            ax.annotate(method, (x, 100 * v["avg_test_acc"]), fontsize=8, xytext=(4, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters per task (log)")
        ax.set_ylabel("average test accuracy (%)")
        ax.set_title(arch)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def _count(value: float | list | None) -> int | str:
    """A per-task count for the report: the mean of a per-task list, ``-`` when absent."""
    if value is None:
        return "-"
    return int(statistics.mean(value)) if isinstance(value, list) else int(value)


def _cell(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{scale * value:.{digits}f}"


def markdown(summary: dict[str, dict], results: list[dict], forgetting: dict[str, dict], mimic: dict,
             task_order: list[str] | None = None) -> str:
    lines = ["# RECAST report", ""]
    if mimic:
        lines += ["## Neural Mimicry", "",
                  "| arch | min weight cos | min feature cos | acc original | acc reconstructed | top-1 agreement on tasks "
                  "| penultimate cos on tasks | templates | coefs/task | seconds |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for arch, m in sorted(mimic.items()):
            lines.append(f"| {arch} | {_cell(m.get('min_weight_cosine'), digits=6)} | "
                         f"{_cell(m.get('min_feature_cosine'), digits=6)} | {_cell(m.get('acc_original'), 100)} | "
                         f"{_cell(m.get('acc_reconstructed'), 100)} | {_cell(m.get('top1_agreement'), 100)} | "
                         f"{_cell(m.get('penultimate_cosine'), digits=6)} | "
                         f"{m.get('templates', '')} | {m.get('coefficients_per_task', '')} | {m.get('seconds', 0):.2f} |")
        lines.append("")
    archs = sorted({k.split("/")[0] for k in summary})
    for arch in archs:
        present = {r["task"] for r in results if r["arch"] == arch and not r.get("sequential")}
        tasks = [t for t in (task_order or []) if t in present] + sorted(present - set(task_order or []))
        lines += [f"## {arch}: task-wise test accuracy (%)", "",
                  "| method | " + " | ".join(tasks) + " | avg | forgetting | method params/task | head params/task "
                  "| bytes/task | wall s |",
                  "|---" * (len(tasks) + 7) + "|"]
        for key, v in sorted(summary.items(), key=lambda kv: kv[1].get("trainable_params", 0) if not isinstance(kv[1].get("trainable_params"), list) else 0):
            a, method = key.split("/", 1)
            if a != arch:
                continue
            accs = v.get("test_acc") or dict(zip(v.get("tasks", tasks), v.get("final_acc", [])))
            cells = [f"{100 * accs[t]:.2f}" if t in accs else "-" for t in tasks]
            forg = v.get("avg_forgetting")
            if method == "recast" and arch in forgetting:
                forg = forgetting[arch]["avg_forgetting"]
            tp = _count(v.get("task_params", v.get("trainable_params")))
            hp = _count(v.get("head_params"))
            by = v.get("bytes", v.get("bytes_per_task", "-"))
            by = int(statistics.mean(by)) if isinstance(by, list) else (int(by) if by != "-" else by)
            wall = v.get("train_seconds", v.get("wall_time_s", 0))
            wall = sum(wall) if isinstance(wall, list) else wall
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {100 * v['avg_test_acc']:.2f} | "
                         f"{'-' if forg is None else f'{100 * forg:.2f}'} | {tp} | {hp} | {by} | {wall:.1f} |")
        lines.append("")
    for arch, f in sorted(forgetting.items()):
        lines += [f"## {arch}: RECAST tasks re-evaluated after each new task (one model, shared banks)", "",
                  "| after \\ on | " + " | ".join(f["tasks"]) + " |", "|---" * (len(f["tasks"]) + 1) + "|"]
        for t, row in zip(f["tasks"], f["acc_matrix"]):
            lines.append(f"| {t} | " + " | ".join("" if a is None else f"{100 * a:.2f}" for a in row) + " |")
        lines.append("")
    return "\n".join(lines)


def run(p: EvaluateParams, p_tune: TuneParams, rt: RuntimeParams, combine_dir: str = "outputs/combine") -> dict[str, Any]:
    results, summary = [], {}
    for stage, out_dir in (("tune", p_tune.out_dir), ("combine", combine_dir)):
        path = resolve(out_dir) / "results.json"
        if path.exists():
            results += json.loads(path.read_text())
        mpath = resolve(f"metrics/{stage}.json")
        if mpath.exists():
            summary.update(json.loads(mpath.read_text()))
    mimic = json.loads(resolve("metrics/mimic.json").read_text()) if resolve("metrics/mimic.json").exists() else {}
    forgetting = recast_forgetting(p.forgetting_archs, resolve(p_tune.out_dir), results, p_tune, rt,
                                   p.forgetting_method)
    report_dir = resolve(p.report_dir)
    plot_params_vs_acc(summary, report_dir / "params_vs_acc.png")
    md = markdown(summary, results, forgetting, mimic, task_names(p_tune))
    (report_dir / "report.md").write_text(md + "\n")
    metrics = {}
    for key, v in summary.items():
        tp = v.get("trainable_params")
        metrics[key] = {"avg_test_acc": round(v["avg_test_acc"], 6),
                        "trainable_params": tp if not isinstance(tp, list) else statistics.mean(tp),
                        "avg_forgetting": forgetting.get(key.split("/")[0], {}).get("avg_forgetting", 0.0)
                        if key.endswith("/recast") else v.get("avg_forgetting")}
    write_json_atomic(resolve("metrics/report.json"), metrics)
    tracker = Tracker("evaluate", rt.experiment, p.model_dump())
    art = report_dir / "report.md"
    tracker.client.log_artifact(tracker.parent_id, str(art))
    tracker.client.log_artifact(tracker.parent_id, str(report_dir / "params_vs_acc.png"))
    tracker.finish({f"{k.replace('/', '.')}.avg_test_acc": v["avg_test_acc"] for k, v in metrics.items()})
    return {"metrics": metrics, "forgetting": forgetting}


def main(argv: list[str] | None = None) -> None:
    data = stage_params(argv, __doc__)
    p = validate_section("evaluate", EvaluateParams, data)
    p_tune = validate_section("tune", TuneParams, data)
    rt = validate_section("runtime", RuntimeParams, data)
    combine = validate_section("combine", CombineParams, data)
    run(p, p_tune, rt, combine.out_dir)
    print((resolve(p.report_dir) / "report.md").read_text())


entry(__name__, __spec__)
