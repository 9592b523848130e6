"""The Markdown report (``reports/report.md``): each section a pandas DataFrame of formatted
cells, written with ``DataFrame.to_markdown`` (pipe tables; ``tabulate`` underneath, with its
number parsing off so that every cell reads exactly as formatted here).

Sections: the Neural Mimicry table; per architecture, the task-wise test accuracy (Tables 1/2
style, from ``stages.report.tables.task_stats``/``method_stats``); the accuracy matrices of
RECAST trained task after task and of the payload-loading check; per architecture the
sequential methods' average accuracy, forgetting, BWT and FWT and each one's accuracy matrix
(``stages.report.tables.continual_stats``); the lineage of the results.
"""

from __future__ import annotations

import socket
import statistics
from typing import Any

import pandas as pd

from recast.machine import machine_record
from stages.report.tables import ALPHA, PAIRED_TEST


def table(frame: pd.DataFrame) -> str:
    """``frame`` (cells already formatted as text) as a Markdown pipe table, without its index."""
    return frame.to_markdown(index=False, tablefmt="pipe", disable_numparse=True, missingval="")


def section(title: str, frame: pd.DataFrame, intro: str = "") -> list[str]:
    """A ``## title`` section: optional intro paragraph, the table, a blank line."""
    return [f"## {title}", "", *([intro, ""] if intro else []), table(frame), ""]


def pm(mean: float, std: float) -> str:
    """``mean ± std`` in percent; ``-`` for the std of a single seed."""
    return f"{100 * mean:.2f} ± " + ("-" if pd.isna(std) else f"{100 * std:.2f}")


def count(value: float | list | None) -> int | str:
    """A per-task count for the report: the mean of a per-task list, ``-`` when absent."""
    if value is None:
        return "-"
    return int(statistics.mean(value)) if isinstance(value, list) else int(value)


def cell(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{scale * value:.{digits}f}"


MIMICRY_COLUMNS = ["arch", "min weight cos", "min feature cos", "acc original", "acc reconstructed",
                   "top-1 agreement on tasks", "penultimate cos on tasks", "templates", "coefs/task", "seconds"]


def mimicry_frame(mimic: dict[str, dict]) -> pd.DataFrame:
    """One row per arch (the reconstruction tuning starts from), then one per ablation (other
    reconstructions, never tuned: gradient, VAE)."""
    rows = []
    for arch, m in sorted(mimic.items()):
        rows.append([arch, cell(m.get("min_weight_cosine"), digits=6), cell(m.get("min_feature_cosine"), digits=6),
                     cell(m.get("acc_original"), 100), cell(m.get("acc_reconstructed"), 100),
                     cell(m.get("top1_agreement"), 100), cell(m.get("penultimate_cosine"), digits=6),
                     str(m.get("templates", "")), str(m.get("coefficients_per_task", "")), f"{m.get('seconds', 0):.2f}"])
        for key, ab in sorted(m.items()):
            if key.startswith("ablation.") and isinstance(ab, dict):
                rows.append([f"{arch} ({key[len('ablation.'):]})", cell(ab.get("min_weight_cosine"), digits=6),
                             cell(ab.get("min_feature_cosine"), digits=6), "-", cell(ab.get("acc_reconstructed"), 100),
                             "-", "-", "", "", f"{ab.get('seconds', 0):.2f}"])
    return pd.DataFrame(rows, columns=MIMICRY_COLUMNS)


def continual_of(continual: pd.DataFrame | None, arch: str, method: str) -> pd.Series | None:
    """The continual-stats row of ``method`` trained task after task on ``arch`` (a method that
    also runs per task appears there as ``<method>_sequential``), or None."""
    if continual is None or continual.empty:
        return None
    rows = continual[(continual["arch"] == arch) & continual["method"].isin([method, f"{method}_sequential"])]
    return None if rows.empty else rows.iloc[0]


def accuracy_frame(arch: str, summary: dict[str, dict], tasks: pd.DataFrame, methods: pd.DataFrame,
                   continual: pd.DataFrame | None = None, task_order: list[str] | None = None,
                   lrs: dict[tuple[str, str], tuple[str, str]] | None = None) -> pd.DataFrame:
    """Task-wise test accuracy of ``arch``, one row per method (fewest trainable parameters
    first): per task mean ± std over seeds, the average, the paper's number when ``methods`` has
    it, forgetting (the continual table's: mean ± std over seeds of the method trained task after
    task, where it was), parameters and bytes per task, wall time."""
    t_arch = tasks[tasks["arch"] == arch]
    present = list(t_arch["task"].unique())
    order = [t for t in (task_order or []) if t in present] + sorted(set(present) - set(task_order or []))
    paper = "paper" in methods.columns
    head = ["method", *order, "avg (mean ± std over seeds)", "seeds", *(["paper", "ours - paper"] if paper else []),
            "forgetting (mean ± std)", "method params/task", "head params/task", "bytes/task", "wall s", "lr",
            "lr source"]
    m_arch = methods[methods["arch"] == arch].set_index("method")

    def params_key(kv: tuple[str, dict]) -> Any:
        tp = kv[1].get("trainable_params", 0)
        return tp if not isinstance(tp, list) else 0

    rows = []
    for key, v in sorted(summary.items(), key=params_key):
        a, method = key.split("/", 1)
        if a != arch or method not in m_arch.index:
            continue
        by_task = t_arch[t_arch["method"] == method].set_index("task")
        cells = [pm(by_task.at[t, "mean"], by_task.at[t, "std"]) if t in by_task.index else "-" for t in order]
        m = m_arch.loc[method]
        extra = []
        if paper:
            extra = ["-" if pd.isna(m["paper"]) else f"{m['paper']:.1f}", "-" if pd.isna(m["diff"]) else f"{m['diff']:+.2f}"]
        seq = continual_of(continual, arch, method)
        forg = "-" if seq is None or seq["forgetting_mean"] is None or pd.isna(seq["forgetting_mean"]) else \
            pm(seq["forgetting_mean"], seq["forgetting_std"])
        by = v.get("bytes", v.get("bytes_per_task", "-"))
        by = int(statistics.mean(by)) if isinstance(by, list) else (int(by) if by != "-" else by)
        wall = v.get("train_seconds", v.get("wall_time_s", 0))
        wall = sum(wall) if isinstance(wall, list) else wall
        rows.append([method, *cells, pm(m["mean"], m["std"]), str(int(m["n_seeds"])), *extra,
                     forg, str(count(v.get("task_params", v.get("trainable_params")))),
                     str(count(v.get("head_params"))), str(by), f"{wall:.1f}",
                     *(lrs or {}).get((arch, method), ("-", "-"))])
    return pd.DataFrame(rows, columns=head)


def matrix_frame(f: dict[str, Any]) -> pd.DataFrame:
    """An accuracy matrix (%): row i = after task i, column j = on task j (blank above the diagonal)."""
    rows = [[t, *("" if a is None else f"{100 * a:.2f}" for a in row)] for t, row in zip(f["tasks"], f["acc_matrix"])]
    return pd.DataFrame(rows, columns=["after \\ on", *f["tasks"]])


def lineage_frame(lineage: pd.DataFrame) -> pd.DataFrame:
    """The jobs of the results tables grouped by code commit, dirtiness and params digest."""
    groups = lineage.groupby(["git_commit", "git_dirty", "params_sha256"], dropna=False).size()
    rows = [[str(commit), str(dirty), str(params)[:16], str(n)] for (commit, dirty, params), n in groups.items()]
    return pd.DataFrame(rows, columns=["git commit", "dirty", "params sha256", "jobs"])


CONTINUAL_COLUMNS = ["method", "seeds", "avg acc", "forgetting", "BWT", "FWT vs head-only"]
CONTINUAL_INTRO = ("Sequential methods: one shared model trained task after task (task-incremental, one head "
                   "per task), every earlier task re-tested after each new one. Mean ± std over seeds, in %, of "
                   "the metrics of `recast.baselines.results` over the accuracy matrix R (R[i][j]: on task j "
                   "after training task i): average accuracy (mean of the last row), forgetting (Chaudhry et al. "
                   "2018), BWT = mean over j < T-1 of R[T-1][j] - R[j][j], FWT = mean over j >= 1 of R[j][j] - b_j "
                   "(Lopez-Paz & Ranzato 2017), with **b_j = head-only's test accuracy on task j** (the same "
                   "frozen pretrained backbone, a fresh head trained on task j alone, at the same budget; "
                   "mean over its seeds).")
BUDGET_NOTE = ("Budget: every method, per-task and sequential alike, trains `tune.train`'s epochs and "
               "learning-rate schedule at the rate `tune.lr_by_method` gives it; each job's MLflow run records "
               "that rate and where it came from (tag `lr.source`).")


def continual_frame(stats: pd.DataFrame) -> pd.DataFrame:
    """One row per sequential method of one arch (``stages.report.tables.continual_stats`` rows)."""
    rows = [[r["method"], str(int(r["n_seeds"])), *(pm(r[f"{m}_mean"], r[f"{m}_std"]) if r[f"{m}_mean"] is not None
                                                    and not pd.isna(r[f"{m}_mean"]) else "-"
                                                    for m in ("avg_acc", "forgetting", "bwt", "fwt"))]
            for _, r in stats.iterrows()]
    return pd.DataFrame(rows, columns=CONTINUAL_COLUMNS)


def comparison_frame(comp: pd.DataFrame) -> pd.DataFrame:
    """The paper's orderings, per arch: the paired difference and what the test says."""
    rows = []
    for _, r in comp.iterrows():
        diff = "-" if r["diff_mean"] is None or pd.isna(r["diff_mean"]) else \
            f"{100 * r['diff_mean']:+.2f} ± " + ("-" if r["diff_std"] is None or pd.isna(r["diff_std"])
                                                 else f"{100 * r['diff_std']:.2f}")
        p = r["p_value"]
        if p is None or pd.isna(p):
            verdict = "too few pairs to test"
        elif not r["larger_than_spread"]:
            verdict = "within its spread"
        else:
            verdict = "larger than its spread, " + ("as the paper orders" if r["diff_mean"] > 0
                                                    else "against the paper's order")
        rows.append([r["arch"], f"{r['higher']} - {r['lower']}", r["paper"], diff, str(int(r["pairs"])),
                     f"{int(r['higher_wins'])} / {int(r['lower_wins'])}", "-" if p is None or pd.isna(p) else f"{p:.3g}",
                     verdict])
    return pd.DataFrame(rows, columns=["arch", "difference", "paper's ordering", "mean ± std (points)", "pairs",
                                       "pairs won (first / second)", "p", "verdict"])


def inflora_note(arch: str, stats: pd.DataFrame, methods: pd.DataFrame) -> str:
    """This run's InfLoRA and head-only averages on ``arch`` (and on the first task), or ''."""
    inf = stats[stats["method"] == "inflora"]
    head = methods[(methods["arch"] == arch) & (methods["method"] == "head_only")]
    if inf.empty or head.empty:
        return ""
    r = inf.iloc[0]
    return (f"This run, {arch}: InfLoRA averages {100 * r['avg_acc_mean']:.1f} % against head-only's "
            f"{100 * head.iloc[0]['mean']:.1f} %; InfLoRA's first task ends at {100 * r['acc_matrix'][0][0]:.1f} %.")


SEQUENTIAL_TITLE = ("RECAST trained task after task on one model: every task re-evaluated after each new one "
                    "(continual protocol; forgetting above comes from this)")
RELOAD_TITLE = "loading check: RECAST payloads loaded into one model, earlier tasks re-evaluated after each load"
COMPARISON_INTRO = ("Each row: the test accuracy of the first method minus the second's, paired on the same task "
                    "and seed (mean ± std over the pairs, in points), how many pairs each side wins, and the p-value of "
                    "the {test}. 'Larger than its spread' means p < {alpha}; with few pairs (one seed) the test cannot "
                    "reach it.").format(test=PAIRED_TEST, alpha=ALPHA)
LINEAGE_INTRO = ("Every accuracy above is the mean over the jobs of `outputs/{tune,combine}/results.parquet`; each "
                 "row there names its MLflow run (`run_id`), code (`git_commit`), params and data digests.")


def run_info(frame: pd.DataFrame, results: list[dict], summary: dict, tasks: list[str], config: str) -> dict[str, Any]:
    """What the report's opening says about this run (``stages.report.markdown.run_header``), from
    the results' own lineage columns and job records."""
    commits = {}
    if "git_commit" in frame.columns:
        for commit, dirty in frame[["git_commit", "git_dirty"]].drop_duplicates().itertuples(index=False):
            commits[str(commit)] = commits.get(str(commit), False) or str(dirty).lower() in ("true", "1")
    here, cpu = socket.gethostname(), machine_record()["cpu_model"]
    machines = sorted({f"{r['host']}{' (' + cpu + ')' if r['host'] == here else ''}, "
                       f"{r.get('torch_threads', '?')} torch thread(s) per job" for r in results if r.get("host")})
    if not machines:
        m = machine_record()
        machines = [f"{here} ({m['cpu_model']})"]
    seeds = sorted({int(s) for s in frame["seed"]}) if "seed" in frame.columns else []
    sha = sorted(set(frame["params_sha256"])) if "params_sha256" in frame.columns else []
    return {"config": config, "params_sha256": sha[0] if len(sha) == 1 else None,
            "archs": sorted({k.split("/")[0] for k in summary}), "tasks": tasks, "seeds": seeds,
            "commits": commits, "machines": machines}


def run_header(info: dict[str, Any]) -> list[str]:
    """The report's opening: what this run was (config, archs, tasks, seeds, commit, machine) and
    how to read the tables. ``info`` keys: ``config``, ``params_sha256``, ``archs``, ``tasks``,
    ``seeds``, ``commits`` ({commit: dirty}), ``machines`` (CPU models and torch threads)."""
    def join(values: Any) -> str:
        return ", ".join(f"`{v}`" for v in values) if values else "-"

    commits = info.get("commits") or {}
    code = ", ".join(f"`{c[:12]}`{' (uncommitted changes)' if dirty else ''}" for c, dirty in commits.items()) or "-"
    sha = info.get("params_sha256")
    return [
        f"**What ran.** Config `{info.get('config', 'params.yaml')}`"
        + (f" (params sha256 `{str(sha)[:12]}`)" if sha else "")
        + f"; architectures {join(info.get('archs'))}; tasks, in training order, {join(info.get('tasks'))}; "
        f"seeds {join(info.get('seeds'))}; code {code}; machine {join(info.get('machines'))}.",
        "",
        "**How to read it.** Accuracies are test accuracies in %, as mean ± std over the seeds (std `-` for "
        "one seed). Per-task methods train one task at a time from the same pretrained backbone; sequential "
        "methods train one model on the tasks in order, and their forgetting (also in the task-wise tables) is "
        "the accuracy lost on earlier tasks by the end. " + BUDGET_NOTE,
    ]


def markdown(summary: dict[str, dict], tasks: pd.DataFrame, methods: pd.DataFrame, forgetting: dict[str, dict],
             mimic: dict, task_order: list[str] | None = None, reload: dict[str, dict] | None = None,
             lineage: pd.DataFrame | None = None, continual: pd.DataFrame | None = None,
             run_info: dict[str, Any] | None = None, forgetting_method: str = "recast",
             comparisons: pd.DataFrame | None = None,
             lrs: dict[tuple[str, str], tuple[str, str]] | None = None) -> str:
    """The report. ``tasks``/``methods``: ``stages.report.tables.task_stats``/``method_stats``
    frames; ``summary``: the tune and combine stages' metrics; ``forgetting``/``reload``: per arch
    an accuracy matrix; ``lineage``: the jobs' results table (its lineage columns);
    ``continual``: ``stages.report.tables.continual_stats`` (per arch and sequential method:
    average accuracy, forgetting, BWT, FWT and the accuracy matrix); ``run_info``: what ran
    (``run_header``); ``comparisons``: ``stages.report.tables.paired_comparisons``; ``lrs``: each method's lr and its source
    (``stages.report.tables.learning_rates``)."""
    lines = ["# RECAST report", "", *run_header(run_info or {}), ""]
    if mimic:
        lines += section("Neural Mimicry", mimicry_frame(mimic))
    for arch in sorted({k.split("/")[0] for k in summary}):
        lines += section(f"{arch}: task-wise test accuracy (%), mean ± std over seeds",
                         accuracy_frame(arch, summary, tasks, methods, continual, task_order, lrs))
    for arch in ([] if continual is None or continual.empty else sorted(continual["arch"].unique())):
        stats = continual[continual["arch"] == arch]
        lines += section(f"{arch}: continual learning, sequential methods (%)", continual_frame(stats), CONTINUAL_INTRO)
        note = inflora_note(arch, stats, methods)
        lines += [note, ""] if note else []
        for _, r in stats.iterrows():
            lines += section(f"{arch}/{r['method']}: accuracy matrix (%), mean over seeds",
                             matrix_frame({"tasks": r["tasks"], "acc_matrix": r["acc_matrix"]}))
    for arch, f in sorted(forgetting.items()):  # printed above, as the continual table's matrix, where it ran
        if continual_of(continual, arch, forgetting_method) is None:
            lines += section(f"{arch}: {SEQUENTIAL_TITLE}", matrix_frame(f))
    for arch, f in sorted((reload or {}).items()):
        lines += section(f"{arch}: {RELOAD_TITLE}", matrix_frame(f))
    if comparisons is not None and not comparisons.empty:
        lines += section("The paper's orderings, paired over tasks and seeds",
                         comparison_frame(comparisons.sort_values("arch", kind="stable")), COMPARISON_INTRO)
    if lineage is not None and "git_commit" in lineage.columns:
        lines += section("Lineage", lineage_frame(lineage), LINEAGE_INTRO)
    return "\n".join(lines)
