"""The curation subgraph the full and retrain pipelines share: embed, dedup and curate, each fanned
out over ``parallelism`` parallel tasks.

Every fanned-out stage is three steps (``dinoflow.stages._fanout``): a ``plan`` task (embed: check
the inputs and bootstrap the embedder once; dedup / curate: train the IVF coarse quantizer on a
sample, tune nprobe, assign the pool's rows their lists), then one ``part`` task per part number in a
``dsl.ParallelFor`` (embed: a row range of whole batches, on its own GPU; dedup / curate: a pool
partition indexed and searched, so no task holds the whole pool's index), then the stage task
itself, which collects the parts (embed lists their shards, dedup merges the top-k and decides,
curate merges each seed's neighbours and selects). Its result is the stage's result, as before:
downstream tasks are wired as they were. ``parallelism=1`` runs the same graph with one part; the
outputs do not depend on it.
"""

from typing import Any, List  # noqa: UP035 (KFP reads the annotation of a component's output)

from kfp import dsl

from dinoflow.components.curate import curate
from dinoflow.components.dedup import dedup
from dinoflow.components.embed import embed
from dinoflow.kfp import IMAGE
from dinoflow.kfp.gpu import cpu_task, gpu_task
from dinoflow.pipelines.parts import one_gpu

PARALLELISM = 1  # parts per fanned-out stage; each embed part takes one GPU of the pool


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def part_numbers(parallelism: int) -> List[int]:  # noqa: UP006
    """0 .. parallelism - 1: the items each fan-out's ParallelFor iterates over."""
    if parallelism < 1:
        raise ValueError(f"parallelism must be at least 1, got {parallelism}")
    return list(range(parallelism))


def fan_out(
    component: Any, name: str, args: dict[str, Any], parallelism: Any, numbers: Any, place: Any
) -> Any:
    """``component`` as a plan task, ``parallelism`` part tasks in a ParallelFor, then the stage task
    that collects them (returned). ``place(task, display_name, phase)`` sets a task's resources."""
    plan = place(
        component(**args, output_name=name, phase="plan", parts=parallelism), f"{name} (plan)", "plan"
    )
    with dsl.ParallelFor(numbers, name=f"{name}-parts") as i:
        part = component(**args, output_name=name, phase="part", part=i, parts=parallelism)
        place(part, f"{name} (part)", "part").after(plan)
    final = place(component(**args, output_name=name, parts=parallelism), name, "collect")
    return final.after(part)


def curation(
    *,
    embed_spec: Any,
    dedup_spec: Any,
    curate_spec: Any,
    secret: Any,
    gpu: dict[str, Any],
    common: dict[str, Any],
    parallelism: Any,
    pool: dict[str, Any],
    eval_set: dict[str, Any],
    seed: dict[str, Any] | None = None,
    reference: dict[str, Any] | None = None,
    share_embedder: bool = False,
    curate_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Embed the sets, dedup the pool (against ``eval_set`` and ``reference``), curate it around the
    ``seed`` set (default: ``reference``, else ``eval_set``). Each set is the embed task's name and inputs
    (``{"name": "embed-pool", "split": ..., "manifest": ...}``); with ``share_embedder`` the other sets
    are embedded with the pool's (maybe bootstrapped) backbone. Returns the collecting tasks by name
    (the embeds', ``dedup``, ``curate``)."""
    numbers = cpu_task(part_numbers(parallelism=parallelism), secret, display_name="part numbers").output

    def on_gpu(task: Any, display: str, phase: str) -> Any:
        if phase == "collect":  # lists the parts' shards: no GPU
            return cpu_task(task, secret, display_name=display)
        return gpu_task(task, secret, display_name=display, **one_gpu(gpu))

    def on_cpu(task: Any, display: str, phase: str) -> Any:
        return cpu_task(task, secret, display_name=display)

    def embedded(spec: dict[str, Any], **extra: Any) -> Any:
        args = {k: v for k, v in spec.items() if k != "name"}
        return fan_out(
            embed,
            spec["name"],
            {"spec_json": embed_spec, **args, **extra, **common},
            parallelism,
            numbers,
            on_gpu,
        )

    tasks: dict[str, Any] = {}
    first = embedded(pool)
    tasks[pool["name"]] = first
    shared = {"backbone": first.outputs["result"]} if share_embedder else {}
    for spec in (eval_set, seed, reference):
        if spec is not None and spec["name"] not in tasks:  # a set named twice is embedded once
            tasks[spec["name"]] = embedded(spec, **shared)
    refs = {"reference": tasks[reference["name"]].outputs["result"]} if reference else {}
    tasks["dedup"] = fan_out(
        dedup,
        "dedup",
        {
            "spec_json": dedup_spec,
            "pool": first.outputs["result"],
            "eval_set": tasks[eval_set["name"]].outputs["result"],
            **refs,
            **common,
        },
        parallelism,
        numbers,
        on_cpu,
    )
    seeds = tasks[(seed or reference or eval_set)["name"]]
    tasks["curate"] = fan_out(
        curate,
        "curate",
        {
            "spec_json": curate_spec,
            "pool": tasks["dedup"].outputs["result"],
            "seed": seeds.outputs["result"],
            **(curate_args or {}),
            **common,
        },
        parallelism,
        numbers,
        on_cpu,
    )
    return tasks
