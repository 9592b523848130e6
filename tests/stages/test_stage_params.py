"""Bad params fail before any compute, with the key named; the paper config passes the dry run."""

import copy

import pytest
import yaml

from stages.config.common import REPO_ROOT, ParamsError
from stages.config.validate import validate_all


@pytest.fixture(scope="module")
def default_params():
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


def _mutate(params, path, value, delete=False):
    p = copy.deepcopy(params)
    node = p
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return p


@pytest.mark.parametrize("path, value, expected", [
    (("tune", "trian"), {}, "tune.trian"),                                   # unknown key
    (("tune", "train", "epochs"), "ten", "tune.train.epochs"),               # wrong type
    (("tune", "train", "epochs"), 0, "tune.train.epochs"),                   # out of range
    (("pretrain", "archs", "vit", "model"), "vit_nonexistent_9", "pretrain.archs.vit.model"),  # unknown timm model
    (("tune", "tasks"), ["mnist_lo5", "imagenet"], "tune.tasks"),           # unknown task
    (("mimic", "archs", "vit", "overrides"), {"groups": 4}, "mimic.archs.vit"),  # G does not divide depth 6
    (("mimic", "archs", "vit", "preset"), "recast_everything", "mimic.archs.vit.preset"),
    (("runtime", "device"), "tpu", "runtime.device"),
    (("runtime", "precision"), "fp8", "runtime.precision"),
    (("tune", "methods", "bad"), {"kind": "adapter", "adapter": "nope"}, "tune.methods.bad"),
    (("tune", "continual", "methods"), {"vit": ["ewc", "sgd_magic"]}, "tune.continual.methods.vit"),
    (("prepare", "val_fraction"), 0.9, "prepare.val_fraction"),
    (("tune", "continual", "options"), {"ewc": {"lamda": 1.0}}, "tune.continual.options.ewc"),  # typo in a key
    (("tune", "continual", "options"), {"hat": {}}, "tune.continual.options.hat"),  # method not in the run
])
def test_bad_params_name_the_key(default_params, path, value, expected):
    with pytest.raises(ParamsError) as err:
        validate_all(_mutate(default_params, path, value))
    assert expected in str(err.value)


def test_fp16_on_cpu_is_refused_by_name(default_params):
    """fp16 autocast needs CUDA (and its grad scaler): refused before any compute, naming the key."""
    for device, gpus in (("cpu", 0.0), ("auto", 0.0)):
        p = _mutate(default_params, ("runtime", "precision"), "fp16")
        p["runtime"].update(device=device, gpus_per_task=gpus)
        with pytest.raises(ParamsError, match=r"runtime\.precision: precision 'fp16' on device 'cpu': fp16 "
                                              r"autocast needs a CUDA device; use 'bf16'"):
            validate_all(p)
    assert validate_all(_mutate(default_params, ("runtime", "precision"), "bf16"))  # bf16 runs on CPU


def test_missing_and_unknown_sections(default_params):
    with pytest.raises(ParamsError, match="tune"):
        validate_all(_mutate(default_params, ("tune",), None, delete=True))
    with pytest.raises(ParamsError, match="tunes"):
        validate_all({**default_params, "tunes": {}})


def test_default_plan(default_params):
    """The quick default: 3 tasks, one seed, one method of each family."""
    plan = validate_all(default_params)
    assert plan["suite"] == "offline" and plan["tasks"] == ["mnist_lo5", "mnist_hi5_inv", "uci_digits"]
    assert plan["mimic"]["vit"]["coefficients_per_task"] == 6 * 3 * 2 * 2
    assert plan["jobs"] == {"pretrain": 2, "mimic": 2, "tune": 4 * 3 + 4, "combine": 2 * 3}
    # (vit, resnet: head_only, recast) x 3 tasks + ewc, inflora, recast on vit, recast on resnet; adaptformer(_recast) on vit
    assert sorted(k for k in plan["tune"] if k.endswith("(sequential)")) == [
        "resnet/recast (sequential)", "vit/ewc (sequential)", "vit/inflora (sequential)", "vit/recast (sequential)"]


def test_offline_full_plan():
    """configs/offline-full.yaml: the former default (every method, both ablations, every continual
    baseline, 5 tasks), with 3 seeds."""
    params = yaml.safe_load((REPO_ROOT / "configs" / "offline-full.yaml").read_text())
    plan = validate_all(params)
    assert plan["suite"] == "offline" and len(plan["tasks"]) == 5
    assert params["tune"]["seeds"] == [42, 1998, 3142592]
    assert sorted(params["mimic"]["archs"]["vit"]["ablations"]) == ["gradient", "vae"]
    # (vit: 3 methods, resnet: 2) x 5 tasks x 3 seeds + (ewc, lwf, inflora, recast on vit, recast on resnet) x 3 seeds
    assert plan["jobs"] == {"pretrain": 2, "mimic": 2, "tune": 5 * 5 * 3 + 5 * 3, "combine": 4 * 5 * 3}


def test_paper_config_dry_run():
    """The paper configuration validates and plans without downloads (models on meta device)."""
    params = yaml.safe_load((REPO_ROOT / "configs" / "paper.yaml").read_text())
    plan = validate_all(params)
    assert plan["tasks"] == ["flowers102", "aircraft", "indoor67", "cifar100", "cifar10", "cub200"]
    assert plan["mimic"]["vit"] == {"model": "vit_small_patch16_224", "banks": 12, "coefficients_per_task": 96,
                                    "template_params": 14_155_776}
    assert plan["mimic"]["resnet"]["coefficients_per_task"] == 168
    assert plan["mimic"]["resnet"]["template_params"] == 16_367_616
    assert plan["tune"]["vit/recast"] == 6 * 3  # six tasks x three seeds
    assert plan["device"] == "cuda"
    assert params["runtime"]["precision"] == "bf16"


def test_train_overrides_give_the_arch_its_own_recipe(default_params):
    """``tune.train_overrides.<arch>`` reaches that arch's jobs only (paper: ResNet batch 64)."""
    from stages.config.params import TuneParams

    tune = {**default_params["tune"], "train_overrides": {"resnet": {"batch_size": 64}}}
    p = TuneParams.model_validate(tune)
    assert p.train_for("resnet").batch_size == 64 and p.train_for("vit").batch_size == p.train.batch_size == 128
    with pytest.raises(ParamsError, match=r"tune\.train_overrides.*not one of archs"):
        validate_all({**default_params, "tune": {**tune, "train_overrides": {"deit": {"batch_size": 64}}}})
    with pytest.raises(ParamsError, match=r"tune\.train_overrides.*batch_size"):
        validate_all({**default_params, "tune": {**tune, "train_overrides": {"resnet": {"batch_size": 0}}}})


def test_mimic_ablations_are_validated_naming_the_ablation(default_params):
    mimic = default_params["mimic"]
    bad = {**mimic, "archs": {**mimic["archs"], "vit": {**mimic["archs"]["vit"], "ablations": {"g": {"method": "svd"}}}}}
    with pytest.raises(ParamsError, match=r"mimic\.archs\.vit.*ablations\.g"):
        validate_all({**default_params, "mimic": bad})


def test_validate_reports_every_invalid_key_of_every_section(default_params, tmp_path):
    """One run names every bad key of every section (it stopped at the first section: runtime),
    and the command prints the message alone and exits 2 (it printed an 18-line traceback, exit 1)."""
    import subprocess
    import sys

    bad = _mutate(default_params, ("runtime", "num_cpus"), "two")
    bad = _mutate(bad, ("runtime", "bogus"), 1)
    bad = _mutate(bad, ("tune", "seeds"), "42")
    bad = _mutate(bad, ("evaluate", "nope"), 2)
    keys = ["runtime.num_cpus", "runtime.bogus", "tune.seeds", "evaluate.nope"]
    with pytest.raises(ParamsError) as err:
        validate_all(bad)
    lines = str(err.value).splitlines()
    assert [line.split(":")[0].strip() for line in lines[1:]] == keys, lines
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    proc = subprocess.run([sys.executable, "-m", "stages.config.validate", "--params", str(path)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == lines


def test_params_yaml_is_dvc_hydra_composition_of_conf(tmp_path):
    """``params.yaml`` is exactly what ``dvc exp run`` composes from ``conf/`` (so a `-S` of one
    value changes one value, not the file's layout: it rewrote 26 + 16 lines), and
    ``-S config=<name>`` composes each configuration file and records its name."""
    import difflib

    from dvc.utils.hydra import compose_and_dump

    def compose(*overrides: str) -> str:
        out = tmp_path / f"p{len(list(tmp_path.iterdir()))}.yaml"
        compose_and_dump(out, str(REPO_ROOT / "conf"), None, "config", str(tmp_path), list(overrides))
        return out.read_text()

    committed = (REPO_ROOT / "params.yaml").read_text()
    assert compose() == committed
    diff = [d for d in difflib.unified_diff(committed.splitlines(), compose("tune.seeds=[42,1998]").splitlines(),
                                            lineterm="", n=0) if d[:1] in "+-" and d[:3] not in ("+++", "---")]
    assert diff == ["+  - 1998"]
    for name, path in (("default", "conf/config/default.yaml"), ("offline-full", "configs/offline-full.yaml"),
                       ("paper", "configs/paper.yaml")):
        composed = yaml.safe_load(compose(f"config={name}"))
        assert composed == yaml.safe_load((REPO_ROOT / path).read_text()) and composed["config"] == name
