"""The coefficient registry from the command line: list the registered task payloads, or fetch
one (safetensors + JSON sidecar) into a folder, e.g. to ship it to a device.

    python -m stages.registry list [--arch vit] [--method recast]
    python -m stages.registry fetch vit mnist_rot [--method recast] [--alias best] [--out payloads/]
    python -m stages.registry show recast.vit.recast.mnist_rot[@best|@current|@<version>]
    python -m stages.registry reproduce recast.vit.recast.mnist_rot[@...] [--out reproduced/]
    python -m stages.registry link [--experiment recast]

``show`` prints a payload version's lineage: its run, git commit, the stage's dvc deps and
params hashes, the task data digest, backbone and bank sha256. ``reproduce`` re-runs the job
spec stored on that run (``job/spec.json``) in this process on inputs rebuilt from the folders
the run recorded (an ``InputStore(None)``; their content digests must be the spec's, i.e. the task
data, backbone and banks on disk are the ones the version was trained on), writes the payload and
compares its bytes with the registered ones. ``link`` prints the MLflow UI's address of the
pipeline's experiment, opened on its training runs (``make ui`` serves the embedded store there).

The store is MLFLOW_TRACKING_URI, else the embedded ``mlflow.db`` beside the repo.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.entities.model_registry import ModelVersion

from recast.io import save_tensors, tensors_sha256
from recast.machine import machine_record
from stages.config.common import DEFAULT_PARAMS, read_params, resolve
from stages.jobs.inputs import InputStore, backbone_bundle, banks_bundle, task_bundle
from stages.jobs.results import JOB_SPEC_ARTIFACT, payload_sidecar
from stages.jobs.train import dispatch
from stages.tracking.payloads import download_payload, list_registered
from stages.tracking.runlog import load_json_artifact
from stages.tracking.store import make_client, tracking_uri, ui_link


def list_table(arch: str | None = None, method: str | None = None) -> list[dict]:
    """Registered payloads, filtered by arch and method, one row each."""
    return [r for r in list_registered()
            if (arch is None or r.get("arch") == arch) and (method is None or r.get("method") == method)]


def fetch(arch: str, task: str, method: str, alias: str, out: Path) -> list[Path]:
    """Copy one registered payload's files into ``out``; returns their paths."""
    folder = download_payload(arch, task, method, alias=alias)
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in sorted(folder.iterdir()):
        target = out / path.name
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(path, tmp)
        tmp.replace(target)
        copied.append(target)
    shutil.rmtree(folder, ignore_errors=True)
    return copied


def model_version(ref: str) -> ModelVersion:
    """``NAME``, ``NAME@alias`` or ``NAME@<version number>`` -> the model version (default alias
    ``current``)."""
    name, _, selector = ref.partition("@")
    selector = selector or "current"
    client = make_client()
    if selector.isdigit():
        return client.get_model_version(name, selector)
    return client.get_model_version_by_alias(name, selector)


def lineage(ref: str) -> dict[str, Any]:
    """Everything a payload version leads back to: version tags, its run (id, name, link),
    the run's lineage tags (``git.*``, ``dvc.*``, ``params.*``) and dataset inputs."""
    mv = model_version(ref)
    client = make_client()
    run = client.get_run(mv.run_id)
    keep = ("git.", "dvc.", "params.", "backbone_sha256", "bank_sha256", "torch.", "nondeterministic_ops", "cached")
    return {
        "name": mv.name, "version": str(mv.version), "aliases": list(getattr(mv, "aliases", []) or []),
        "run_id": mv.run_id, "run_name": run.info.run_name, "experiment_id": run.info.experiment_id,
        "run_link": ui_link(run.info.experiment_id, mv.run_id),
        "version_tags": dict(sorted(mv.tags.items())),
        "run_tags": {k: v for k, v in sorted(run.data.tags.items()) if k.startswith(keep)},
        "datasets": [{"name": d.dataset.name, "digest": d.dataset.digest, "source": json.loads(d.dataset.source),
                      **json.loads(d.dataset.profile or "{}")} for d in run.inputs.dataset_inputs],
    }


def rebuild_inputs(spec: dict, sources: dict[str, str]) -> InputStore:
    """An ``InputStore`` (no Ray) holding the bundles of ``spec["inputs"]``, rebuilt from the
    folders the job's run recorded (``sources``: role -> folder); each rebuilt bundle must have
    the key the spec names, i.e. the task data, backbone and banks on disk are the bytes the
    version was trained on."""
    store = InputStore(None)
    wrong = []
    for role, key in spec.get("inputs", {}).items():
        kind = key.split("-", 1)[0]
        if role not in sources:
            raise ValueError(f"cannot reproduce: the run recorded no folder for input '{role}' ({key})")
        folder = resolve(sources[role])
        if kind == "task":
            bundle = task_bundle(folder)
        elif kind == "backbone":
            bundle = backbone_bundle(folder, spec["arch"])
        elif kind == "banks":
            bundle = banks_bundle(folder, spec["arch"])
        else:
            raise ValueError(f"cannot reproduce: input '{role}' is a '{kind}' bundle, which reproduce cannot rebuild")
        got = store.add(bundle)
        if got != key:
            wrong.append(f"{role} (registered {key}, on disk {got} at {folder})")
    if wrong:
        raise ValueError("cannot reproduce: inputs on disk differ from the registered version's: " + ", ".join(wrong))
    return store


def reproduce(ref: str, out: Path) -> dict[str, Any]:
    """Re-run the job of a registered payload version; write its payload under ``out`` and
    compare the bytes of both files with the registered payload's."""
    mv = model_version(ref)
    uri = tracking_uri()
    job = load_json_artifact(mv.run_id, JOB_SPEC_ARTIFACT, uri)
    spec = job["spec"]
    store = rebuild_inputs(spec, job.get("sources", {}))
    if job.get("torch_threads"):
        torch.set_num_threads(int(job["torch_threads"]))  # the job's thread count (float reductions)
    result = dispatch(spec, store.local(spec["inputs"]))
    meta, tensors = result.metrics, result.tensors
    sha = tensors_sha256(tensors)
    stem = f"{spec['task']}-s{spec['seed']}"
    made = save_tensors(tensors, {**payload_sidecar(spec, meta), "payload_sha256": sha}, out / stem)
    with tempfile.TemporaryDirectory(prefix="recast-registered-") as tmp:
        folder = Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="payload", dst_path=tmp,
                                                          tracking_uri=uri))
        same = {suffix: (folder / (stem + suffix)).read_bytes() == made.with_suffix(suffix).read_bytes()
                for suffix in (".safetensors", ".json")}
    return {"name": mv.name, "version": str(mv.version), "run_id": mv.run_id, "payload": str(made),
            "payload_sha256": sha, "registered_sha256": mv.tags.get("payload_sha256", ""),
            "identical_safetensors": same[".safetensors"], "identical_json": same[".json"],
            "recorded_machine": job.get("machine", {}), "machine": machine_record()}


def experiment_link(name: str | None = None) -> str:
    """``ui_link`` of the experiment ``name`` (default: ``runtime.experiment`` of params.yaml).

    Raises:
        LookupError: the store holds no such experiment.
    """
    name = name or read_params(DEFAULT_PARAMS)["runtime"]["experiment"]
    exp = make_client().get_experiment_by_name(name)
    if exp is None:
        raise LookupError(f"no MLflow experiment named {name!r} in {tracking_uri()}: run the pipeline first")
    return ui_link(exp.experiment_id)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="list registered task payloads")
    ls.add_argument("--arch", default=None)
    ls.add_argument("--method", default=None)
    get = sub.add_parser("fetch", help="copy one task's payload files into a folder")
    get.add_argument("arch")
    get.add_argument("task")
    get.add_argument("--method", default="recast")
    get.add_argument("--alias", default="best", choices=("best", "current"))
    get.add_argument("--out", type=Path, default=Path("payloads"))
    show = sub.add_parser("show", help="print a payload version's lineage (JSON)")
    show.add_argument("ref", help="NAME[@alias|@version], e.g. recast.vit.recast.mnist_rot@best")
    rep = sub.add_parser("reproduce", help="re-run a payload version's job and compare the bytes")
    rep.add_argument("ref", help="NAME[@alias|@version]")
    rep.add_argument("--out", type=Path, default=Path("reproduced"))
    link = sub.add_parser("link", help="the MLflow UI's address of the pipeline's training runs")
    link.add_argument("--experiment", default=None, help="default: runtime.experiment of params.yaml")
    args = ap.parse_args(argv)
    if args.command == "link":
        try:
            print(experiment_link(args.experiment))
        except LookupError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        return 0
    if args.command in ("show", "reproduce"):
        try:
            result = lineage(args.ref) if args.command == "show" else reproduce(args.ref, args.out)
        except Exception as err:  # noqa: BLE001 - MLflow raises its own types; name what was asked
            print(f"error: {args.command} {args.ref}: {err}", file=sys.stderr)
            return 1
        print(json.dumps(result, indent=2))
        return 0 if args.command == "show" or (result["identical_safetensors"] and result["identical_json"]) else 2
    if args.command == "list":
        rows = list_table(args.arch, args.method)
        print("| name | arch | method | task | best | current |\n|---|---|---|---|---|---|")
        for r in rows:
            aliases = r.get("aliases", {})
            print(f"| {r['name']} | {r.get('arch', '')} | {r.get('method', '')} | {r.get('task', '')} | "
                  f"{aliases.get('best', '')} | {aliases.get('current', '')} |")
        print(f"{len(rows)} registered payload(s)", file=sys.stderr)
        return 0
    try:
        files = fetch(args.arch, args.task, args.method, args.alias, args.out)
    except Exception as err:  # noqa: BLE001 - MLflow raises its own types; name what was asked
        print(f"error: no payload '{args.alias}' for arch={args.arch} task={args.task} method={args.method}: {err}",
              file=sys.stderr)
        return 1
    for path in files:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
