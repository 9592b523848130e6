"""Results tables: a sequential run of a method that also runs per task keeps its own name."""

from __future__ import annotations

import io

import pandas as pd

from stages.report.tables import accuracies, method_stats, results_frame, task_stats


def test_sequential_recast_does_not_mix_with_per_task_recast():
    rows = [{"arch": "vit", "method": "recast", "task": t, "seed": s, "test_acc": acc, "sequential": False}
            for t, s, acc in (("a", 0, 0.9), ("b", 0, 0.8), ("a", 1, 0.7), ("b", 1, 0.6))]
    rows.append({"arch": "vit", "method": "recast", "seed": 0, "sequential": True, "task_names": ["a", "b"],
                 "final_acc": [0.5, 0.4], "acc_matrix": [[0.5, None], [0.5, 0.4]]})
    rows.append({"arch": "vit", "method": "lwf", "seed": 0, "sequential": True, "task_names": ["a", "b"],
                 "final_acc": [0.3, 0.2], "acc_matrix": [[0.3, None], [0.1, 0.2]]})
    frame = results_frame(rows)
    frame = pd.read_parquet(_roundtrip(frame))  # as evaluate reads it: list columns are JSON text
    acc = accuracies(frame)
    assert sorted(acc["method"].unique()) == ["lwf", "recast", "recast_sequential"]
    stats = task_stats(acc).set_index(["method", "task"])
    assert stats.loc[("recast", "a"), "n_seeds"] == 2 and abs(stats.loc[("recast", "a"), "mean"] - 0.8) < 1e-12
    assert stats.loc[("recast_sequential", "b"), "n_seeds"] == 1
    assert abs(stats.loc[("recast_sequential", "b"), "mean"] - 0.4) < 1e-12
    methods = method_stats(acc).set_index("method")
    assert abs(methods.loc["recast", "mean"] - 0.75) < 1e-12 and methods.loc["recast", "n_seeds"] == 2
    assert abs(methods.loc["lwf", "mean"] - 0.25) < 1e-12


def _roundtrip(frame: pd.DataFrame) -> io.BytesIO:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    buf.seek(0)
    return buf


def _continual_rows() -> list[dict]:
    """Head-only per task (the FWT reference) and EWC over tasks a, b, c with two seeds, by hand:
    seed 0: R = [[.8], [.6, .7], [.5, .6, .9]]: ACC .6667, forgetting (.3 + .1)/2 = .2,
            BWT ((.5-.8) + (.6-.7))/2 = -.2, FWT ((.7-.6) + (.9-.8))/2 = .1 (b = .9, .6, .8);
    seed 1: R = [[.8], [.8, .7], [.7, .6, .9]]: ACC .7333, forgetting .1, BWT -.1, FWT .1."""
    rows = [{"arch": "vit", "method": "head_only", "task": t, "seed": 0, "test_acc": acc, "sequential": False}
            for t, acc in (("a", 0.9), ("b", 0.6), ("c", 0.8))]
    for seed, matrix in ((0, [[0.8, None, None], [0.6, 0.7, None], [0.5, 0.6, 0.9]]),
                         (1, [[0.8, None, None], [0.8, 0.7, None], [0.7, 0.6, 0.9]])):
        rows.append({"arch": "vit", "method": "ewc", "seed": seed, "sequential": True, "task_names": ["a", "b", "c"],
                     "final_acc": matrix[-1], "acc_matrix": matrix})
    return rows


def test_continual_metrics_on_hand_computed_matrices():
    from stages.report.tables import continual_metrics, continual_run_metrics, continual_stats

    per_seed = continual_metrics(_continual_rows()).set_index("seed")
    assert abs(per_seed.at[0, "avg_acc"] - 2.0 / 3) < 1e-12 and abs(per_seed.at[0, "forgetting"] - 0.2) < 1e-12
    assert abs(per_seed.at[0, "bwt"] + 0.2) < 1e-12 and abs(per_seed.at[0, "fwt"] - 0.1) < 1e-12
    assert abs(per_seed.at[1, "bwt"] + 0.1) < 1e-12 and abs(per_seed.at[1, "forgetting"] - 0.1) < 1e-12
    stats = continual_stats(continual_metrics(_continual_rows()))
    (row,) = stats.to_dict("records")
    assert row["n_seeds"] == 2 and abs(row["avg_acc_mean"] - 0.7) < 1e-12 and abs(row["bwt_mean"] + 0.15) < 1e-12
    assert abs(row["acc_matrix"][1][0] - 0.7) < 1e-12 and row["acc_matrix"][0][1] is None  # mean over seeds
    mlflow = continual_run_metrics(stats)
    assert set(mlflow) == {"vit.ewc.avg_acc", "vit.ewc.forgetting", "vit.ewc.bwt", "vit.ewc.fwt"}
    assert abs(mlflow["vit.ewc.fwt"] - 0.1) < 1e-12 and abs(mlflow["vit.ewc.forgetting"] - 0.15) < 1e-12
    # without the reference on every task, no FWT (never a partial mean)
    no_ref = [r for r in _continual_rows() if not (r["method"] == "head_only" and r["task"] == "c")]
    assert continual_metrics(no_ref)["fwt"].isna().all()


def test_report_cells_of_the_continual_table():
    from stages.report.markdown import continual_frame, markdown
    from stages.report.tables import continual_metrics, continual_stats

    stats = continual_stats(continual_metrics(_continual_rows()))
    (cells,) = continual_frame(stats).to_dict("records")
    assert cells == {"method": "ewc", "seeds": "2", "avg acc": "70.00 ± 4.71", "forgetting": "15.00 ± 7.07",
                     "BWT": "-15.00 ± 7.07", "FWT vs head-only": "10.00 ± 0.00"}
    acc = accuracies(results_frame(_continual_rows()))
    md = markdown({}, task_stats(acc), method_stats(acc), {}, {}, ["a", "b", "c"], continual=stats)
    assert "## vit: continual learning, sequential methods (%)" in md and "b_j = head-only's test accuracy" in md
    assert "## vit/ewc: accuracy matrix (%), mean over seeds" in md
    assert "| b            | 70.00 | 70.00 |       |" in md and "| c            | 60.00 | 60.00 | 90.00 |" in md


def test_report_gives_one_forgetting_per_method_and_opens_with_what_ran():
    from stages.report.markdown import accuracy_frame, markdown, run_header
    from stages.report.tables import continual_metrics, continual_stats

    rows = _continual_rows()
    stats = continual_stats(continual_metrics(rows))
    acc = accuracies(results_frame(rows))
    # the stage summary carries the FIRST seed's forgetting (0.2); the report must show the mean over seeds
    summary = {"vit/ewc": {"avg_forgetting": 0.2, "trainable_params": 10}, "vit/head_only": {"trainable_params": 5}}
    frame = accuracy_frame("vit", summary, task_stats(acc), method_stats(acc), stats, ["a", "b", "c"])
    forgetting = dict(zip(frame["method"], frame["forgetting (mean ± std)"]))
    assert forgetting == {"head_only": "-", "ewc": "15.00 ± 7.07"}  # the continual table's cell
    head = run_header({"config": "offline-full.yaml", "archs": ["vit"], "tasks": ["a", "b"], "seeds": [1, 2],
                       "commits": {"0123456789abcdef": True}, "machines": ["CPU X, 1 torch thread(s)"]})
    assert head[0] == ("**What ran.** Config `offline-full.yaml`; architectures `vit`; tasks, in training order, "
                       "`a`, `b`; seeds `1`, `2`; code `0123456789ab` (uncommitted changes); machine "
                       "`CPU X, 1 torch thread(s)`.")
    md = markdown(summary, task_stats(acc), method_stats(acc), {"vit": {"tasks": ["a"], "acc_matrix": [[0.5]],
                  "avg_forgetting": 0.0}}, {}, ["a", "b", "c"], continual=stats, forgetting_method="ewc")
    titles = [line for line in md.splitlines() if line.startswith("## ")]
    assert len(titles) == len(set(titles)) and md.count("Budget: every method") == 1
    assert not any("task after task on one model" in t for t in titles)  # ewc's matrix is the continual one


def test_stage_summary_of_a_sequential_method_is_the_mean_over_seeds():
    from stages.jobs.results import summarise

    def seq(seed, matrix):
        final = matrix[-1]
        forgetting = [max(matrix[i][j] for i in range(j, 2)) - final[j] for j in range(1)] + [None]
        return {"arch": "vit", "method": "ewc", "seed": seed, "sequential": True, "task_names": ["a", "b"],
                "acc_matrix": matrix, "final_acc": final, "avg_acc": sum(final) / 2, "forgetting": forgetting,
                "avg_forgetting": forgetting[0], "trainable_params": [10, 12], "bytes_per_task": [40, 48],
                "wall_time_s": [1.0, 2.0]}

    rows = [seq(2, [[0.8, None], [0.4, 0.9]]), seq(1, [[0.8, None], [0.6, 0.7]])]
    s = summarise(rows)["vit/ewc"]
    assert s["seeds"] == 2 and abs(s["avg_forgetting"] - 0.3) < 1e-12  # (0.4 + 0.2) / 2, not one seed's
    assert abs(s["avg_test_acc"] - 0.65) < 1e-12 and s["test_acc"] == {"a": 0.5, "b": 0.8}
    assert s["acc_matrix"][1] == [0.5, 0.8] and s["acc_matrix"][0][1] is None and s["forgetting"][1] is None
    assert s["train_seconds"] == 6.0 and s["trainable_params"] == 11 and s["sequential"] is True


def test_paired_comparisons_state_difference_spread_and_test():
    """The paper's orderings, paired over (task, seed): the mean and std of the differences, the
    wins, the Wilcoxon p-value; a consistent gain is 'larger than its spread', a noisy one is not,
    and a consistent loss is named as against the paper's order."""
    from stages.report.markdown import comparison_frame
    from stages.report.tables import paired_comparisons, paper_pairs

    rows = []
    for task in range(4):
        for seed in range(3):
            base = 0.5 + 0.05 * task + 0.01 * seed
            rows += [
                {"arch": "vit", "method": "head_only", "task": f"t{task}", "seed": seed, "test_acc": base},
                {"arch": "vit", "method": "recast", "task": f"t{task}", "seed": seed, "test_acc": base + 0.02 + 0.001 * seed},
                {"arch": "vit", "method": "clr", "task": f"t{task}", "seed": seed, "test_acc": base},
                {"arch": "vit", "method": "clr_recast", "task": f"t{task}", "seed": seed,
                 "test_acc": base + (0.03 if (task + seed) % 2 else -0.03)},
                {"arch": "vit", "method": "inflora", "task": f"t{task}", "seed": seed, "test_acc": base - 0.1 - 0.01 * task}]
    acc = pd.DataFrame(rows)
    assert [p[:2] for p in paper_pairs(list(acc["method"].unique()))] == [
        ("head_only", "recast"), ("clr", "clr_recast"), ("head_only", "inflora")]
    comp = paired_comparisons(acc).set_index("higher")
    assert comp.loc["recast", "pairs"] == 12 and comp.loc["recast", "higher_wins"] == 12
    assert abs(comp.loc["recast", "diff_mean"] - 0.021) < 1e-9 and comp.loc["recast", "p_value"] < 0.001
    assert comp.loc["recast", "larger_than_spread"]
    assert (comp.loc["clr_recast", "higher_wins"], comp.loc["clr_recast", "lower_wins"]) == (6, 6)
    assert abs(comp.loc["clr_recast", "diff_mean"]) < 1e-9 and not comp.loc["clr_recast", "larger_than_spread"]
    assert comp.loc["inflora", "larger_than_spread"] and comp.loc["inflora", "diff_mean"] < 0
    frame = comparison_frame(paired_comparisons(acc)).set_index("difference")
    assert set(frame["arch"]) == {"vit"}
    assert frame.loc["recast - head_only", "mean ± std (points)"] == "+2.10 ± 0.09"  # sample std of 0.020, 0.021, 0.022 (x4): 0.085
    assert frame.loc["recast - head_only", "verdict"] == "larger than its spread, as the paper orders"
    assert frame.loc["clr_recast - clr", "verdict"] == "within its spread"
    assert frame.loc["inflora - head_only", "verdict"] == "larger than its spread, against the paper's order"


def test_report_method_table_shows_each_methods_lr_and_source():
    from stages.report.markdown import accuracy_frame
    from stages.report.tables import learning_rates

    rows = [{"arch": "vit", "method": m, "task": t, "seed": 1, "test_acc": 0.5, "lr": lr, "sequential": False}
            for m, lr in (("head_only", 0.01), ("recast", 0.002)) for t in ("a", "b")]
    rows.append({"arch": "vit", "method": "recast", "task": None, "seed": 1, "lr": 0.002, "sequential": True,
                 "task_names": ["a", "b"], "final_acc": [0.4, 0.5]})
    frame = results_frame(rows)
    lrs = learning_rates(frame, lambda arch, method: f"hpo:key-{method}")
    assert lrs == {("vit", "head_only"): ("0.01", "hpo:key-head_only"), ("vit", "recast"): ("0.002", "hpo:key-recast"),
                   ("vit", "recast_sequential"): ("0.002", "hpo:key-recast")}
    acc = accuracies(frame)
    summary = {"vit/head_only": {"trainable_params": 5}, "vit/recast": {"trainable_params": 9}}
    table = accuracy_frame("vit", summary, task_stats(acc), method_stats(acc), None, ["a", "b"], lrs)
    assert table[["method", "lr", "lr source"]].values.tolist() == [
        ["head_only", "0.01", "hpo:key-head_only"], ["recast", "0.002", "hpo:key-recast"]]
