"""Results tables as pandas DataFrames, stored as Parquet (``outputs/<stage>/results.parquet``,
one row per job).

A column whose values are not all scalars (lists, dicts: e.g. a sequential baseline's
accuracy matrix) is stored as JSON text, so every column has one Parquet type.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

import pandas as pd

from recast.baselines.results import average_accuracy, average_forgetting, backward_transfer, forward_transfer

SCALARS = (str, int, float, bool, type(None))


def results_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per job; non-scalar columns become JSON text (sorted keys)."""
    frame = pd.DataFrame.from_records(rows)
    for col in frame.columns:
        values = frame[col].tolist()
        if not all(isinstance(v, SCALARS) or (isinstance(v, float) and v != v) for v in values):
            frame[col] = [None if v is None or (isinstance(v, float) and v != v) else json.dumps(v, sort_keys=True)
                          for v in values]
    return frame


def write_parquet(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``frame`` to ``path`` through a temp file + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


def write_results(rows: list[dict[str, Any]], out_dir: str | os.PathLike) -> Path:
    """``<out_dir>/results.parquet`` from the stage's rows."""
    return write_parquet(results_frame(rows), Path(out_dir) / "results.parquet")


def read_results(paths: list[Path]) -> pd.DataFrame:
    """The rows of every existing results table, concatenated."""
    frames = [pd.read_parquet(p) for p in paths if p.exists()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


SEQUENTIAL_SUFFIX = "_sequential"  # a valid MLflow metric name part; as ``stages.jobs.results.summarise`` names such a protocol row


def accuracies(results: pd.DataFrame) -> pd.DataFrame:
    """Long table ``arch, method, task, seed, test_acc``: one row per per-task job, and one per
    task of each sequential baseline (its final accuracy on that task). A sequential method that
    also runs per task (RECAST) is named ``<method>_sequential``, so the two never mix."""
    cols = ["arch", "method", "task", "seed", "test_acc"]
    if results.empty:
        return pd.DataFrame(columns=cols)
    sequential = results["sequential"].eq(True) if "sequential" in results else pd.Series(False, index=results.index)
    parts = [results.loc[~sequential, cols]]
    per_task = set(zip(results.loc[~sequential, "arch"], results.loc[~sequential, "method"]))
    for _, r in results.loc[sequential].iterrows():
        names, final = json.loads(r["task_names"]), json.loads(r["final_acc"])
        method = r["method"] + SEQUENTIAL_SUFFIX if (r["arch"], r["method"]) in per_task else r["method"]
        parts.append(pd.DataFrame({"arch": r["arch"], "method": method, "task": names, "seed": r["seed"],
                                   "test_acc": final}))
    return pd.concat(parts, ignore_index=True)


def task_stats(acc: pd.DataFrame) -> pd.DataFrame:
    """Per arch, method and task: mean and (sample) std of the test accuracy over seeds, and the
    number of seeds."""
    return (acc.groupby(["arch", "method", "task"], sort=False)["test_acc"]
            .agg(mean="mean", std="std", n_seeds="count").reset_index())


def method_stats(acc: pd.DataFrame, paper: dict[tuple[str, str], float] | None = None) -> pd.DataFrame:
    """Per arch and method: the accuracy averaged over tasks, its mean and std over seeds, the
    number of seeds; with ``paper`` ({(arch, method): percent}), the paper's number and ours minus
    it (percentage points)."""
    per_seed = acc.groupby(["arch", "method", "seed"], sort=False)["test_acc"].mean().reset_index()
    out = (per_seed.groupby(["arch", "method"], sort=False)["test_acc"]
           .agg(mean="mean", std="std", n_seeds="count").reset_index())
    if paper is not None:
        out["paper"] = [paper.get((a, m)) for a, m in zip(out["arch"], out["method"])]
        out["paper"] = out["paper"].astype("float64")
        out["diff"] = 100 * out["mean"] - out["paper"]
    return out


def sequential_forgetting(results: list[dict], method: str = "recast") -> dict[str, dict[str, Any]]:
    """Per arch, the accuracy matrix of ``method`` trained task after task on ONE model (the tune
    stage's continual job of that method, first seed): the report's forgetting."""
    out: dict[str, dict[str, Any]] = {}
    for r in sorted((r for r in results if r.get("sequential") and r["method"] == method), key=lambda r: r["seed"]):
        out.setdefault(r["arch"], {"tasks": r["task_names"], "acc_matrix": r["acc_matrix"],
                                   "avg_forgetting": r["avg_forgetting"]})
    return out


CONTINUAL_REFERENCE = "head_only"  # FWT's b_j: this per-task method's test accuracy on task j, same budget


def continual_metrics(results: list[dict], reference: str = CONTINUAL_REFERENCE) -> pd.DataFrame:
    """One row per sequential job (arch, method, seed): its accuracy matrix (lists) and the
    metrics of ``recast.baselines.results`` over it: average accuracy, average forgetting, BWT,
    and FWT against ``reference``'s per-task test accuracy on the same arch (mean over its seeds;
    None where it did not run every task). A sequential method that also runs per task is named
    ``<method>_sequential``, as in ``accuracies``."""
    cols = ["arch", "method", "seed", "tasks", "acc_matrix", "avg_acc", "forgetting", "bwt", "fwt"]
    per_task = [r for r in results if not r.get("sequential")]
    names = {(r["arch"], r["method"]) for r in per_task}
    ref: dict[tuple[str, str], list[float]] = {}
    for r in per_task:
        if r["method"] == reference:
            ref.setdefault((r["arch"], r["task"]), []).append(float(r["test_acc"]))
    rows = []
    for r in sorted((r for r in results if r.get("sequential")), key=lambda r: (r["arch"], r["method"], r["seed"])):
        matrix, tasks = r["acc_matrix"], list(r["task_names"])
        b = [statistics.mean(ref[(r["arch"], t)]) if (r["arch"], t) in ref else None for t in tasks]
        fwt = forward_transfer(matrix, b) if None not in b else None
        method = r["method"] + SEQUENTIAL_SUFFIX if (r["arch"], r["method"]) in names else r["method"]
        rows.append([r["arch"], method, r["seed"], tasks, matrix, average_accuracy(matrix),
                     average_forgetting(matrix), backward_transfer(matrix), fwt])
    return pd.DataFrame(rows, columns=cols)


def continual_stats(frame: pd.DataFrame) -> pd.DataFrame:
    """Per arch and sequential method: mean and (sample) std over seeds of ``avg_acc``,
    ``forgetting``, ``bwt``, ``fwt`` (columns ``<metric>_mean``, ``<metric>_std``), the number of
    seeds, and the accuracy matrix averaged over seeds (``acc_matrix``, None above the diagonal)."""
    metrics = ["avg_acc", "forgetting", "bwt", "fwt"]
    rows = []
    for (arch, method), g in frame.groupby(["arch", "method"], sort=False):
        row: dict[str, Any] = {"arch": arch, "method": method, "n_seeds": len(g), "tasks": g["tasks"].iloc[0]}
        for m in metrics:
            values = [float(v) for v in g[m] if v is not None and not pd.isna(v)]
            row[f"{m}_mean"] = statistics.mean(values) if len(values) == len(g) else None
            row[f"{m}_std"] = statistics.stdev(values) if len(values) == len(g) and len(values) > 1 else None
        mats = list(g["acc_matrix"])
        row["acc_matrix"] = [[None if v is None else statistics.mean(m[i][j] for m in mats)
                              for j, v in enumerate(r)] for i, r in enumerate(mats[0])]
        rows.append(row)
    return pd.DataFrame(rows)


def continual_run_metrics(continual: pd.DataFrame) -> dict[str, float]:
    """The evaluate run's metrics of each sequential method: ``<arch>.<method>.{avg_acc,
    forgetting, bwt, fwt}`` (means over seeds; FWT only where head-only ran every task)."""
    out = {}
    for _, r in continual.iterrows():
        for m in ("avg_acc", "forgetting", "bwt", "fwt"):
            value = r[f"{m}_mean"]
            if value is not None and value == value:
                out[f"{r['arch']}.{r['method']}.{m}"] = float(value)
    return out


# ``dvc exp show`` prints one column per headline number, as wide as its dotted name: the short
# method names (README "Experiments") and forgetting for RECAST's sequential run only keep a seed
# change of the default pipeline (11 changed numbers) within a 200-column terminal. Names not
# listed are kept as they are.
HEADLINE_SHORT = {"head_only": "head", "recast": "rc", "adaptformer": "af", "full_ft": "full"}
RECAST_SUFFIX = "_recast"


def headline_name(method: str) -> str:
    """A method's name in ``metrics/report.json``: ``HEADLINE_SHORT``, ``<adapter>_recast`` as
    ``<adapter>+rc`` (eq. 6), a per-task method's sequential run (``<method>_sequential``) as
    ``seq`` for RECAST and ``<short>_seq`` otherwise."""
    if method.endswith(SEQUENTIAL_SUFFIX):
        base = method[: -len(SEQUENTIAL_SUFFIX)]
        return "seq" if base == "recast" else headline_name(base) + "_seq"
    if method.endswith(RECAST_SUFFIX) and method != "recast":
        return headline_name(method[: -len(RECAST_SUFFIX)]) + "+rc"
    return HEADLINE_SHORT.get(method, method)


def headline_metrics(summary: dict[str, Any], mimic: dict[str, Any]) -> dict[str, Any]:
    """The few numbers that ``dvc metrics`` and ``dvc exp show`` compare (``metrics/report.json``;
    everything else is in ``reports/`` and MLflow), methods named by ``headline_name``:
    ``<arch>.<method>``, the average test accuracy in % of every method; ``fgt.<arch>``, the
    average forgetting in points of RECAST's sequential run (the baselines' forgetting is in the
    report's continual table and the evaluate run's metrics); ``params.<arch>.<method>``, the
    trainable parameters per task of every per-task method; ``mimic_cos.<arch>``, the closed-form
    mimicry's minimum weight cosine; ``train_min``, the minutes all tune and combine jobs trained."""
    acc: dict[str, dict[str, float]] = {}
    out: dict[str, Any] = {"fgt": {}, "params": {}}
    for key, v in sorted(summary.items()):
        arch, method = key.split("/", 1)
        name = headline_name(method)
        group = acc.setdefault(arch, {})
        if name in group:
            raise ValueError(f"two methods of {arch} are named {name!r} in metrics/report.json (headline_name)")
        group[name] = round(100 * v["avg_test_acc"], 2)
        if v.get("sequential"):
            if name == "seq":
                out["fgt"][arch] = round(100 * v["avg_forgetting"], 2)
        else:
            out["params"].setdefault(arch, {})[name] = round(v["trainable_params"])
    out["mimic_cos"] = {arch: round(m["min_weight_cosine"], 6) for arch, m in sorted(mimic.items())
                        if isinstance(m, dict) and "min_weight_cosine" in m}
    out["train_min"] = round(sum(v.get("train_seconds", 0.0) for v in summary.values()) / 60, 1)
    clash = set(acc) & set(out)
    assert not clash, f"an arch named like a headline group: {clash}"
    return {**acc, **out}


PAIRED_TEST = "Wilcoxon signed-rank test, two-sided, over the (task, seed) pairs"
ALPHA = 0.05


def paper_pairs(methods: list[str]) -> list[tuple[str, str, str]]:
    """The orderings the paper states, as (lower, higher, how the paper puts it), for the methods
    present: head-only < RECAST; each adapter <= the adapter + RECAST (``<adapter>_recast``, eq. 6);
    InfLoRA against head-only."""
    have = set(methods)
    pairs = [("head_only", "recast", "head-only < RECAST")]
    pairs += [(m[: -len("_recast")], m, f"{m[: -len('_recast')]} <= {m[: -len('_recast')]} + RECAST")
              for m in sorted(have) if m.endswith("_recast") and m[: -len("_recast")] in have]
    pairs.append(("head_only", "inflora", "InfLoRA vs head-only"))
    return [p for p in pairs if p[0] in have and p[1] in have]


def paired_comparisons(acc: pd.DataFrame) -> pd.DataFrame:
    """For each arch and ordering of ``paper_pairs``: the paired differences ``higher - lower`` of
    the test accuracy over every (task, seed) both methods ran, their mean and (sample) std, how
    many pairs favour each side, and the ``PAIRED_TEST`` p-value (None below 2 non-zero pairs).
    ``larger_than_spread``: p < ``ALPHA``."""
    from scipy.stats import wilcoxon

    rows = []
    for arch in acc["arch"].unique():
        a = acc[acc["arch"] == arch]
        for low, high, order in paper_pairs(list(a["method"].unique())):
            x = a[a["method"] == low].set_index(["task", "seed"])["test_acc"]
            y = a[a["method"] == high].set_index(["task", "seed"])["test_acc"]
            both = x.index.intersection(y.index)
            d = (y.loc[both] - x.loc[both]).astype(float)
            nonzero = int((d != 0).sum())
            p = float(wilcoxon(d.to_numpy()).pvalue) if nonzero >= 2 else None
            rows.append({"arch": arch, "lower": low, "higher": high, "paper": order, "pairs": len(d),
                         "diff_mean": float(d.mean()) if len(d) else None,
                         "diff_std": float(d.std()) if len(d) > 1 else None,
                         "higher_wins": int((d > 0).sum()), "lower_wins": int((d < 0).sum()), "p_value": p,
                         "larger_than_spread": p is not None and p < ALPHA})
    return pd.DataFrame(rows)


def learning_rates(results: pd.DataFrame, source_of: Any) -> dict[tuple[str, str], tuple[str, str]]:
    """Per (arch, method) as the report names it (``accuracies``): the lr its jobs trained at
    (several values joined) and ``source_of(arch, method)``, where that lr comes from."""
    if results.empty or "lr" not in results.columns:
        return {}
    sequential = results["sequential"].eq(True) if "sequential" in results else pd.Series(False, index=results.index)
    per_task = set(zip(results.loc[~sequential, "arch"], results.loc[~sequential, "method"]))
    out: dict[tuple[str, str], tuple[str, str]] = {}
    for (arch, method, seq), rows in results.groupby(["arch", "method", sequential.rename("seq")], sort=False):
        name = method + SEQUENTIAL_SUFFIX if seq and (arch, method) in per_task else method
        lrs = sorted({float(v) for v in rows["lr"].dropna()})
        out[(arch, name)] = (", ".join(f"{v:.3g}" for v in lrs) or "-", source_of(arch, method))
    return out
