"""What runs inside a component: spec JSON + upstream result artifacts -> one stage -> typed outputs.

A component body is one call of :func:`component_main`; everything it does lives here so
that it is tested once. The component itself computes nothing: it wires URIs, calls
``dinoflow.stages.get_stage(name).run(spec, store)`` and copies the stage's own outputs (result
JSON, metrics, report HTML, model card) into KFP artifacts for the UI.

Output locations are content-addressed: ``{output_root}/{data_version}/{output_name}/{spec_hash}``,
where the hash covers the spec after the upstream URIs were filled in. A changed input or parameter
therefore always writes a new prefix (never stale output), and an unchanged one finds the stage's
``_SUCCESS`` marker and returns at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from dinoflow.errors import SpecError

log = logging.getLogger(__name__)

# Set by the local runner (``dinoflow demo``): one JSON line per executed task, for stage timings.
EVENTS_ENV = "DINOFLOW_KFP_EVENTS"


def spec_hash(spec: dict[str, Any]) -> str:
    """Hash of a spec without its output location (the location is derived from it)."""
    body = {k: v for k, v in spec.items() if k != "output_uri"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:12]


def output_uri_for(output_root: str, data_version: str, output_name: str, spec: dict[str, Any]) -> str:
    if not output_root.startswith("s3://"):
        raise SpecError(f"output_root must be an s3://bucket/prefix URI, got {output_root!r}")
    if not data_version or "/" in data_version:
        raise SpecError(f"data_version must be a non-empty name without '/', got {data_version!r}")
    return f"{output_root.rstrip('/')}/{data_version}/{output_name}/{spec_hash(spec)}"


# -- upstream results -> spec fields ---------------------------------------------------------------
def manifest_of(result: dict[str, Any], split: str) -> str:
    """The manifest a result offers: an ingest result's ``split``, else its ``manifest_uri``."""
    if "manifests" in result:
        manifests = result["manifests"]
        if split not in manifests:
            raise SpecError(f"upstream ingest has no split {split!r}; it has: {', '.join(sorted(manifests))}")
        return manifests[split]
    if "manifest_uri" in result:
        return result["manifest_uri"]
    raise SpecError(f"upstream result offers no manifest (keys: {', '.join(sorted(result))})")


def backbone_of(result: dict[str, Any], student: str = "") -> str:
    """The backbone a result offers: promote's champion, distill's student, else ``backbone_uri``."""
    if "champion_uri" in result:
        return result["champion_uri"]
    if "backbone_uris" in result:
        uris = result["backbone_uris"]
        if student:
            if student not in uris:
                raise SpecError(f"upstream distill has no student {student!r}; it has: {', '.join(uris)}")
            return uris[student]
        return next(iter(uris.values()))
    if "backbone_uri" in result:
        return result["backbone_uri"]
    raise SpecError(f"upstream result offers no backbone (keys: {', '.join(sorted(result))})")


def teacher_of(result: dict[str, Any]) -> str:
    """What distillation loads as teacher: the pretrain export (its DINO/iBOT heads lie beside it)."""
    return backbone_of(result)


def _has(spec_fields: set[str], name: str) -> bool:
    return name in spec_fields


def fill_from_upstream(
    stage: str,
    spec: dict[str, Any],
    inputs: dict[str, dict[str, Any] | None],
    spec_fields: set[str],
    split: str = "train",
    test_split: str = "test",
    student: str = "",
) -> dict[str, Any]:
    """Return ``spec`` with the fields that the given upstream results provide filled in.

    ``inputs`` maps a role (``manifest``, ``backbone``, ``pool``, ``eval_set``, ``seed``, ``teacher``,
    ``dataset``, ``evaluation``, ``init``, ``reference``) to an upstream result dict, or None when
    not connected. Upstream values win over the spec: the DAG's wiring is the truth.
    """
    spec = dict(spec)
    got = {k: v for k, v in inputs.items() if v is not None}
    if "manifest" in got:
        spec["manifest_uri"] = manifest_of(got["manifest"], split)
    if "backbone" in got:
        spec["backbone_uri"] = backbone_of(got["backbone"], student)
        # evaluate reads the training run's record (curves, budget) when the backbone came from one
        if _has(spec_fields, "training_uri") and "steps" in got["backbone"]:
            spec["training_uri"] = got["backbone"]["output_uri"]
    if "pool" in got:
        spec["manifest_uri"] = manifest_of(got["pool"], split)
        spec["embeddings_uri"] = got["pool"]["embeddings_uri"]
    for role in ("eval_set", "reference"):  # both are sets whose copies leave the pool
        if role in got:
            spec["eval_manifest_uris"] = [
                *spec.get("eval_manifest_uris", []),
                manifest_of(got[role], test_split),
            ]
            spec["eval_embeddings_uris"] = [
                *spec.get("eval_embeddings_uris", []),
                got[role]["embeddings_uri"],
            ]
    if "seed" in got:
        spec["seed_manifest_uris"] = [manifest_of(got["seed"], split)]
        spec["seed_embeddings_uris"] = [got["seed"]["embeddings_uri"]]
    if "teacher" in got:
        spec["teacher_uri"] = teacher_of(got["teacher"])
    if "dataset" in got:
        spec["train_manifest_uri"] = manifest_of(got["dataset"], split)
        spec["test_manifest_uri"] = manifest_of(got["dataset"], test_split)
    if "evaluation" in got:
        spec["evaluation_uri"] = got["evaluation"]["output_uri"]
    if "init" in got:
        # continue training from a champion: the pretrain spec names the field it accepts
        for field in ("init_backbone_uri", "init_uri", "resume_from_uri", "init_from_uri"):
            if _has(spec_fields, field):
                spec[field] = backbone_of(got["init"])
                break
        else:
            raise SpecError(f"{stage} spec has no field to start from a previous backbone")
    return spec


def read_result(artifact: Any) -> dict[str, Any] | None:
    """The upstream stage result held by an optional input artifact (a KFP ``Artifact``, a path, or
    ``None`` when the pipeline did not connect it)."""
    path = getattr(artifact, "path", artifact)
    if not path:
        return None
    p = Path(path)
    if not p.exists():
        raise SpecError(f"upstream result artifact {path} is missing")
    return json.loads(p.read_text())


def _json_object(stage: str, name: str, text: str) -> dict[str, Any]:
    """A pipeline parameter holding a JSON object; anything else fails in one line naming it."""
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as e:
        raise SpecError(f"{stage} {name} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise SpecError(f"{stage} {name} must be a JSON object, got {type(value).__name__}")
    return value


# A component's typed inputs that stand for spec fields (under the spec JSON): GPUs per node -> nproc,
# the full pipeline's typed parameters (source, backbone, steps, ...) -> the stages' fields.
TYPED_DEFAULTS = {
    "gpus": "nproc",
    "nnodes": "nnodes",
    "source_uri": "source_uri",
    "source_kind": "kind",
    "arch": "backbone",
    "steps": "steps",
    "batch_size": "batch_size",
    "students": "students",
    "model_name": "model_name",
    "registry_uri": "registry_uri",
}
# A typed default gives way when the spec names its inputs another way (an ingest spec with splits).
_GIVES_WAY = {"source_uri": ("splits",)}


def typed_defaults(args: dict[str, Any]) -> dict[str, Any]:
    """The spec fields that a component's typed inputs set (empty, 0 or None: not given)."""
    out: dict[str, Any] = {}
    for arg, field in TYPED_DEFAULTS.items():
        value = args.get(arg)
        if value in ("", None, 0) or not isinstance(value, str | int):
            continue
        if field == "students" and isinstance(value, str):  # the UI's "a, b" -> ["a", "b"]
            value = [x.strip() for x in value.split(",") if x.strip()]
        out[field] = value
    return out


def data_version_of(data_version: str, schedule_time: str = "", run_id: str = "") -> str:
    """The run's data version: the one given, else the schedule time of a scheduled run (KFP fills
    ``PIPELINE_JOB_SCHEDULE_TIME_UTC``; a one-off run gets its creation time), else the run id
    (kfp.local and backends that leave the placeholder unfilled)."""
    import re

    if data_version:
        return data_version
    for value, prefix in ((schedule_time, "t"), (run_id, "run-")):
        if value and not value.startswith("{{"):
            return prefix + re.sub(r"[^0-9A-Za-z]+", "", value)[:32]
    raise SpecError("data_version is empty and the run has neither a schedule time nor a run id")


def resolve_pointer(store: Any, uri: str) -> dict[str, Any]:
    """An upstream result kept at a fixed place (``*.json``: the registry's champion, the curated set
    or evaluation set a pipeline published), read when the task runs."""
    if not store.exists(uri):
        raise SpecError(
            f"{uri} does not exist: run the full pipeline first (it publishes the champion, the "
            "curated set and the evaluation set a retrain starts from)"
        )
    value = store.get_json(uri)
    if not isinstance(value, dict):
        raise SpecError(f"{uri} must hold a JSON object, got {type(value).__name__}")
    return value


# -- the component body ----------------------------------------------------------------------------
def run_component(
    stage: str,
    spec_json: str,
    output_root: str,
    data_version: str,
    output_name: str,
    result_path: str,
    overrides_json: str = "{}",
    inputs: dict[str, Any] | None = None,
    split: str = "train",
    test_split: str = "test",
    student: str = "",
    defaults: dict[str, Any] | None = None,
    run_id: str = "",
    schedule_time: str = "",
    publish_uri: str = "",
    phase: str = "",
    part: int = 0,
    parts: int = 0,
) -> dict[str, Any]:
    """Parse and wire the spec (typed ``defaults`` < spec_json < overrides_json < upstream results),
    run the stage (or a multi-node TrainJob), write the result JSON.

    ``defaults`` are the pipeline's typed parameters mapped onto spec fields (``gpus`` -> ``nproc``,
    ``nodes`` -> ``nnodes``, ...); a field the spec JSON sets wins, and fields the stage's spec does not
    have are dropped. ``"@role"`` overrides name an upstream result by URI; one ending in ``.json`` is
    a pointer (the registry's champion, a published curated set) read now. An empty ``data_version``
    is derived from ``schedule_time`` or ``run_id`` (:func:`data_version_of`). ``run_id`` (the KFP
    run's id) also names a multi-node job after its run. ``publish_uri``: the result is also written
    there once the stage finished (a stable name for a later run to read). ``phase`` (``plan`` or
    ``part`` number ``part``) runs one fan-out phase of the stage instead; ``parts`` (> 0) sets the
    spec's part count, which the pipeline's fan-out width decides."""
    from dinoflow.stages import TRAINING_STAGES, get_stage
    from dinoflow.storage import open_store

    st = get_stage(stage)
    fields = set(st.spec_cls.model_fields)
    given = _json_object(stage, "spec_json", spec_json)
    overrides = _json_object(stage, "overrides_json", overrides_json)
    # pipeline parameters (URIs) layered over the spec; empty values mean "not given";
    # "@role" keys stand for an upstream result that offers only that URI (e.g. "@init": champion)
    overrides = {k: v for k, v in overrides.items() if v not in ("", None)}
    named = set(given) | set(overrides)
    spec_dict = {
        k: v
        for k, v in (defaults or {}).items()
        if k in fields and v not in ("", None, 0) and not named & set(_GIVES_WAY.get(k, ()))
    }
    spec_dict.update(given)
    spec_dict.update({k: v for k, v in overrides.items() if not k.startswith("@")})
    if parts > 0 and "parts" in fields:
        spec_dict["parts"] = parts
    results = {role: read_result(p) for role, p in (inputs or {}).items()}
    store = None
    for k, v in overrides.items():
        if k.startswith("@"):
            if str(v).endswith(".json"):
                store = store or open_store()
                results[k[1:]] = resolve_pointer(store, v)
            else:
                results[k[1:]] = {"backbone_uri": v, "manifest_uri": v}
    spec_dict = fill_from_upstream(stage, spec_dict, results, fields, split, test_split, student)
    data_version = data_version_of(data_version, schedule_time, run_id)
    if not spec_dict.get("output_uri"):
        spec_dict["output_uri"] = output_uri_for(output_root, data_version, output_name, spec_dict)
    spec = st.parse_spec(spec_dict)  # one-line SpecError naming the field
    store = store or open_store()

    t0 = time.time()
    nnodes = int(getattr(spec, "nnodes", 1) or 1)
    if stage in TRAINING_STAGES and nnodes > 1:
        from dinoflow import metrics
        from dinoflow.kfp.trainjob import run_multinode

        if run_id and not run_id.startswith("{{"):  # an unresolved placeholder means no run id
            os.environ.setdefault("DINOFLOW_RUN_ID", run_id)
        with metrics.stage_run(stage):  # the launcher's view: the whole job, submit to finish
            result = run_multinode(stage, spec, store)
    elif phase:
        result = st.run_phase(spec, store, phase, part)
    else:
        result = st.run(spec, store).model_dump(mode="json")
    t1 = time.time()
    if publish_uri and not phase:
        store.put_json(publish_uri, result)

    Path(result_path).parent.mkdir(parents=True, exist_ok=True)
    Path(result_path).write_text(json.dumps(result, indent=2, sort_keys=True))
    events = os.environ.get(EVENTS_ENV)
    if events:
        with open(events, "a") as f:
            f.write(
                json.dumps(
                    {
                        "task": output_name,
                        "stage": stage,
                        **({"phase": phase + (f"-{part}" if phase == "part" else "")} if phase else {}),
                        "started": t0,
                        "finished": t1,
                        "seconds": round(t1 - t0, 3),
                        "result": result,
                    }
                )
                + "\n"
            )
    log.info("%s finished in %.1fs: %s", stage, t1 - t0, result.get("output_uri"))
    return result


def component_main(stage: str, args: dict[str, Any], inputs: tuple[str, ...] = ()) -> dict[str, Any]:
    """The whole body of a component. ``args`` is the component function's ``locals()`` (its KFP
    signature: spec_json, output_root, data_version, output_name, overrides_json, the ``result`` and
    ``metrics`` outputs, and optionally split / test_split / student, typed spec defaults, run_id,
    schedule_time, publish_uri); ``inputs`` names its optional upstream-result artifacts. Runs the
    stage, then fills every output the component declares: ``metrics`` always, the ``result``
    artifact's metadata (:func:`describe`: a Model's or Dataset's s3:// URI and key facts), evaluate's ``classification``, ``report`` and ``model_card``, and the output
    parameters ``images`` (images the stage produced) and ``version`` (the run's data version)."""
    res = run_component(
        stage,
        args["spec_json"],
        args["output_root"],
        args["data_version"],
        args["output_name"],
        args["result"].path,
        overrides_json=args["overrides_json"],
        inputs={role: args[role] for role in inputs},
        **{k: args[k] for k in ("split", "test_split", "student") if k in args},
        defaults=typed_defaults(args),
        run_id=args.get("run_id") or "",
        schedule_time=args.get("schedule_time") or "",
        publish_uri=args.get("publish_uri") or "",
        **{k: args[k] for k in ("phase", "part", "parts") if k in args},
    )
    log_metrics(args["metrics"], res)
    args["result"].metadata.update(describe(stage, res))
    if "classification" in args:
        log_confusion(args["classification"], res)
    if "report" in args:
        copy_text(res.get("report_uri"), args["report"].path)
    if "model_card" in args:
        copy_text(res.get("model_card_uri"), args["model_card"].path)
    if args.get("images"):
        _write_parameter(args["images"], sum(res.get("counts", {}).values()))
    if args.get("version"):
        version = data_version_of(
            args["data_version"], args.get("schedule_time") or "", args.get("run_id") or ""
        )
        _write_parameter(args["version"], version)
    return res


def _write_parameter(path: str, value: Any) -> None:
    """An output parameter (``dsl.OutputPath``): its value as text in the file KFP gave."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(str(value))


# -- UI artifacts ----------------------------------------------------------------------------------
# The object a stage's result artifact stands for (a KFP Model: a backbone; a Dataset: a manifest or
# embeddings): its s3:// URI leads the artifact's metadata, for the UI's lineage and a model registry.
_PRIMARY_URI = {
    "ingest": "output_uri",
    "embed": "embeddings_uri",
    "dedup": "manifest_uri",
    "curate": "manifest_uri",
    "pretrain": "backbone_uri",
    "distill": "backbone_uris",
    "evaluate": "output_uri",
    "promote": "champion_uri",
}
_FACTS = ("manifests", "counts", "backbone_uris", "metrics")  # small maps worth showing too


def describe(stage: str, result: dict[str, Any]) -> dict[str, Any]:
    """The result artifact's metadata: ``s3_uri`` (what the artifact stands for), the stage, its
    scalar fields and URIs (counts, steps, loss, dims...) and its small maps (manifests per split,
    students, metrics)."""
    primary = result.get(_PRIMARY_URI.get(stage, "output_uri"))
    if isinstance(primary, dict):  # distill: one backbone per student; the first is evaluated
        primary = next(iter(primary.values()), None)
    meta: dict[str, Any] = {"stage": stage, "s3_uri": primary or result.get("output_uri", "")}
    for k, v in result.items():
        if isinstance(v, str | int | float | bool) or (k in _FACTS and isinstance(v, dict)):
            meta.setdefault(k, v)
    return meta


def scalar_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Numbers worth a KFP Metrics artifact: flat numeric fields and the ``metrics``/``counts`` maps."""
    out: dict[str, float] = {}
    for k, v in result.items():
        if isinstance(v, bool):
            out[k] = float(v)
        elif isinstance(v, int | float):
            out[k] = float(v)
        elif k in ("metrics", "counts") and isinstance(v, dict):
            for kk, vv in v.items():
                if isinstance(vv, int | float) and not isinstance(vv, bool):
                    out[f"{k}.{kk}" if k == "counts" else kk] = float(vv)
    return out


def _touch(artifact: Any, payload: dict[str, Any]) -> None:
    """Give a metadata-only artifact a file too: kfp.local's cache treats a missing file as a miss."""
    path = Path(artifact.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True))


def log_metrics(metrics: Any, result: dict[str, Any]) -> None:
    values = scalar_metrics(result)
    for k, v in sorted(values.items()):
        metrics.log_metric(k, v)
    _touch(metrics, values)


def copy_text(uri: str | None, path: str) -> bool:
    """Copy a small text object (report HTML, model card) from the store into a KFP artifact file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if not uri:
        Path(path).write_text("(the stage produced none)\n")
        return False
    from dinoflow.storage import open_store

    Path(path).write_bytes(open_store().get_bytes(uri))
    return True


def log_confusion(classification: Any, result: dict[str, Any]) -> bool:
    """Log a confusion matrix when the evaluate result carries one (or points to its JSON)."""
    cm = result.get("confusion_matrix")
    if cm is None and result.get("confusion_matrix_uri"):
        from dinoflow.storage import open_store

        cm = open_store().get_json(result["confusion_matrix_uri"])
    if cm is None:
        _touch(classification, {})
        return False
    if isinstance(cm, dict):
        labels, matrix = cm.get("labels"), cm.get("matrix")
    else:
        matrix, labels = cm, None
    if not matrix:
        _touch(classification, {})
        return False
    labels = [str(x) for x in (labels or result.get("class_names") or range(len(matrix)))]
    matrix = [[int(x) for x in row] for row in matrix]
    classification.log_confusion_matrix(labels, matrix)
    _touch(classification, {"labels": labels, "matrix": matrix})
    return True
