"""Resource report: every phase measured on the pipeline's tiny ViT; the paper archs' RECAST
configurations give the paper's counts; the tables are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import markdown_rows
from pipelines.resources import ResourcesConfig, _build, load_config, measure_arch, write_tables


def test_measure_pipeline_vit(stage_outputs, tmp_path: Path) -> None:
    cfg = ResourcesConfig(archs={"vit": {"batch_size": 8, "gradient_mimicry": {"steps": 1000}}},
                          tune_steps=2, mimic_steps=2, warmup_steps=1)
    rows = measure_arch("vit", cfg.archs["vit"].model_dump(), cfg.model_dump(), "cpu")
    by_phase = {r["phase"]: r for r in rows}
    assert list(by_phase) == ["mimicry_gradient", "mimicry_closed_form", "tune_recast", "tune_full"]
    for r in rows:
        assert (r["model"], r["templates"], r["coefficients_per_task"]) == ("test_vit", 6 * 3 * 64 * 192, 72)
        assert r["wall_s"] > 0 and r["peak_rss_mb"] >= r["rss_start_mb"] > 0
    grad = by_phase["mimicry_gradient"]
    assert grad["steps"] == 2 and grad["projected_wall_s"] == pytest.approx(1000 * grad["seconds_per_step"])
    assert by_phase["mimicry_closed_form"]["min_weight_cosine"] == pytest.approx(1.0, abs=1e-9)
    assert by_phase["tune_recast"]["trainable_params"] == 72 + 64 * 10 + 10
    assert by_phase["tune_full"]["trainable_params"] == by_phase["tune_full"]["params"] == 264_650
    assert all(by_phase[p]["steps"] == 2 and by_phase[p]["seconds_per_step"] > 0 for p in ("tune_recast", "tune_full"))

    paths = write_tables(rows, tmp_path)
    assert ["vit", "test_vit", "tune_recast"] in [row[:3] for row in markdown_rows(paths[0].read_text())]
    assert len(json.loads(paths[1].read_text())) == 4


def test_paper_archs_have_the_paper_counts() -> None:
    import recast

    cfg = load_config()
    counts = {}
    for name, arch in cfg.paper_archs.items():
        model, model_name, rcfg = _build(name, arch, Path("."), Path("."))
        c = recast.count_parameters(recast.apply(model, rcfg, inplace=True))
        counts[model_name] = (c.coefficients, c.templates)
    assert counts == {"vit_small_patch16_224": (144, 19_464_192), "resnet34": (168, 16_367_616)}  # SPEC section 2


def test_resources_config_names_bad_keys(tmp_path: Path) -> None:
    from stages.config.common import ParamsError

    assert set(load_config().archs) == {"vit", "resnet"}
    bad = tmp_path / "resources.yaml"
    bad.write_text("archs: {vit: {batch: 8}}\n")
    with pytest.raises(ParamsError, match=r"resources\.archs\.vit\.batch: Extra inputs are not permitted"):
        load_config(bad)
