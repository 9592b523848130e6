"""bf16 against fp32 on the default pipeline's tune stage (CPU autocast), per method.

    python -m benchmarks.bench_precision [--keep DIR] [--json-out benchmarks/results/bench_precision.json]

In a fresh copy of the source tree it runs prepare, pretrain and mimic once, then the tune stage
twice with the default params.yaml: ``runtime.precision: fp32`` (``outputs/tune``) and ``bf16``
(``outputs/tune_bf16``). It prints each method's average test accuracy at both precisions and
their difference, checks every difference is within ``--tolerance`` points (1.5: issue 28), that
every bf16 payload is float32, and writes JSON. Minutes on 2 CPUs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml

from benchmarks.bench_startup import REPO, _timed, scratch_tree


def _payload_dtypes(out_dir: Path) -> set[str]:
    from safetensors import safe_open  # heavy: only after the timed subprocesses

    dtypes = set()
    for path in sorted(out_dir.rglob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            dtypes |= {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    return dtypes


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=Path, default=None, help="run in this folder and keep it")
    ap.add_argument("--tolerance", type=float, default=1.5, help="largest |bf16 - fp32| in accuracy points")
    ap.add_argument("--json-out", type=Path, default=REPO / "benchmarks" / "results" / "bench_precision.json")
    args = ap.parse_args(argv)
    root, env = scratch_tree(args.keep, "bench-precision-")
    py = sys.executable
    seconds = {stage: _timed([py, "-m", f"stages.{stage}"], root, env) for stage in ("prepare", "pretrain", "mimic")}
    params = root / "params.yaml"
    original = yaml.safe_load(params.read_text())
    acc: dict[str, dict[str, float]] = {}
    for precision, out_dir in (("fp32", "outputs/tune"), ("bf16", "outputs/tune_bf16")):
        data = json.loads(json.dumps(original))
        data["runtime"]["precision"] = precision
        data["tune"]["out_dir"] = out_dir
        params.write_text(yaml.safe_dump(data, sort_keys=False))
        seconds[f"tune_{precision}"] = _timed([py, "-m", "stages.tune"], root, env)
        metrics = root / ("metrics/tune.json" if precision == "fp32" else f"{out_dir}/metrics.json")
        summary = json.loads(metrics.read_text())
        acc[precision] = {k: 100 * v["avg_test_acc"] for k, v in summary.items() if "avg_test_acc" in v}
    params.write_text(yaml.safe_dump(original, sort_keys=False))
    rows = {k: {"fp32": acc["fp32"][k], "bf16": acc["bf16"][k], "diff": acc["bf16"][k] - acc["fp32"][k]}
            for k in sorted(acc["fp32"])}
    dtypes = _payload_dtypes(root / "outputs" / "tune_bf16")
    print("| method | fp32 % | bf16 % | bf16 - fp32 |\n|---|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['fp32']:.2f} | {r['bf16']:.2f} | {r['diff']:+.2f} |")
    print(f"bf16 payload dtypes: {sorted(dtypes)}; seconds: {json.dumps({k: round(v, 1) for k, v in seconds.items()})}")
    from recast.machine import machine_record  # torch: imported after the timed subprocesses

    worst = max(abs(r["diff"]) for r in rows.values())
    out = {"methods": rows, "max_abs_diff_points": worst, "tolerance_points": args.tolerance,
           "bf16_payload_dtypes": sorted(dtypes), "seconds": seconds, "machine": machine_record()}
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(out, indent=2) + "\n")
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)
    if worst > args.tolerance or dtypes != {"F32"}:
        raise SystemExit(f"bf16 off by {worst:.2f} points (tolerance {args.tolerance}) or payload dtypes {dtypes}")
    return out


if __name__ == "__main__":
    main()
