"""dinoflow bench copy-detection: the learned copy descriptor against the pixel descriptor and the
bootstrapped SSL backbone, per edit family, with the families split into those seen in the
descriptor's training and those held out from it.

Data (28 px grayscale, all real images; ``dinoflow_tools.pool`` draws the base images, so no two
base images are near-duplicates and none is a near-copy of an evaluation image):

* evaluation set: ``--eval-size`` Fashion-MNIST *test* images (the set decontaminated against);
* test pool: ``--pool-size`` base images + ``--dup-per-family`` copies of distinct pool images and
  ``--contam-per-family`` copies of distinct evaluation images (second half of the set) for EVERY
  family of ``dinoflow.data.edits``, seen and held out;
* validation pool: ``--val-pool-size`` other base images + copies made with the SEEN families only,
  of other pool and evaluation images (first half of the set). Thresholds are chosen here and only
  here: the figures are never reported on the copies the thresholds were fitted to, and no held-out
  family takes part in choosing them;
* Fashion-MNIST train (``--fmnist-train`` images) against all 10k test images, no planted copies:
  the share of train images flagged as contamination.

Embedders, each thresholded on the validation pool: ``learned`` (the pretrain stage with
``method: sscd`` trained on the test pool's own images, then the embed stage with that backbone,
dedup through ``DedupSpec.copy_descriptor``), ``pixel`` (the training-free 14 px descriptor) and
``bootstrap`` (the embed stage's bootstrapped DINOv2 backbone, mean-centred as ``bench dedup``).
The baselines keep the dedup stage's pixel copy detection as configured (``--baseline-copy-detection``);
with the learned descriptor it does not run (candidates come from the descriptor alone).

Thresholds: ``threshold_cos`` = the validation threshold with the best duplicate recall among those
at duplicate precision >= ``--target-dup-precision``; then ``decontam_threshold_cos`` likewise for
contamination (>= ``--target-contam-precision``), for each decontamination rule of ``MARGINS`` (the
plain nearest-evaluation cosine, or less a farther evaluation image's: ``decontam_margin_rank``); the
rule with the best validation recall at the target is used. Scores on the test pool (``dinoflow_tools.scoring``):
recall per family; precision per group (seen / held out): correct removals of the group's copies over
those plus its copies' wrong removals plus EVERY wrong removal of a non-copy (clean images charged to
both groups, so the group precisions are conservative).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time

from dinoflow.methods.sscd_config import SSCD_CPU

VERSION = "v1"  # bump when the data generation changes
PX = 28
EMBEDDERS = ("learned", "pixel", "bootstrap")
CENTER = {"learned": False, "pixel": False, "bootstrap": True}


# -- data -----------------------------------------------------------------------------------------
def _copy28(img, family: str, seed: int):
    import numpy as np
    import torch
    import torch.nn.functional as F

    from dinoflow.data.edits import apply_edit, seed_generator

    y = apply_edit(torch.from_numpy(np.ascontiguousarray(img)), family, seed_generator(seed))
    if tuple(y.shape) != (PX, PX):
        y = F.interpolate(y[None, None].float(), size=(PX, PX), mode="bilinear", antialias=True)[0, 0]
        y = y.round().clamp(0, 255).to(torch.uint8)
    return y.numpy()


def plant(base, base_src, eval_x, eval_rows, families, n_dup: int, n_contam: int, seed: int) -> dict:
    """A pool: ``base`` + ``n_dup`` copies of distinct base images and ``n_contam`` copies of
    distinct ``eval_x[eval_rows]`` images per family, shuffled; ground truth as in dinoflow_tools.pool."""
    import numpy as np

    rng = np.random.default_rng(seed)
    nb = len(base)
    fam_d = np.repeat(np.array(families, dtype=object), n_dup)
    fam_c = np.repeat(np.array(families, dtype=object), n_contam)
    if len(fam_d) > nb or len(fam_c) > len(eval_rows):
        raise ValueError(
            f"{len(fam_d)} duplicate copies need as many distinct pool images ({nb}) and {len(fam_c)} "
            f"contamination copies as many evaluation images ({len(eval_rows)}): lower the copies per family"
        )
    orig = rng.choice(nb, len(fam_d), replace=False)
    c_rows = rng.choice(np.asarray(eval_rows), len(fam_c), replace=False)
    seeds = rng.integers(0, 2**62, len(fam_d) + len(fam_c))
    dup = [_copy28(base[o], f, s) for o, f, s in zip(orig, fam_d, seeds[: len(fam_d)], strict=True)]
    con = [_copy28(eval_x[r], f, s) for r, f, s in zip(c_rows, fam_c, seeds[len(fam_d) :], strict=True)]
    empty = np.zeros((0, PX, PX), np.uint8)
    images = np.concatenate([base, np.stack(dup) if dup else empty, np.stack(con) if con else empty])
    source = np.concatenate([base_src, base_src[orig], np.full(len(con), "fashion_mnist", dtype=object)])
    transform = np.concatenate([np.full(nb, "", dtype=object), fam_d, fam_c])
    copy_of = np.concatenate([np.full(nb, -1), orig, np.full(len(con), -1)]).astype(np.int64)
    contamination_of = np.concatenate([np.full(nb + len(dup), -1), c_rows]).astype(np.int64)
    order = rng.permutation(len(images))
    where = np.empty_like(order)
    where[order] = np.arange(len(order))
    copy_of = copy_of[order]
    copy_of = np.where(copy_of >= 0, where[np.maximum(copy_of, 0)], -1)
    return {
        "images": images[order],
        "source": source[order],
        "transform": transform[order],
        "copy_of": copy_of,
        "contamination_of": contamination_of[order],
    }


def _write_pool(store, prefix: str, pool: dict, split: str) -> tuple[str, str]:
    """The pool's shards + manifest and its ground truth; returns both URIs."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dinoflow.storage.client import join_uri
    from dinoflow_tools.pool import _write_set

    n = len(pool["images"])
    uri, rows = _write_set(
        store, join_uri(prefix, split), pool["images"], list(pool["source"]), np.full(n, -1), split, 10_000
    )
    keys = [r["key"] for r in rows]
    gt = pa.table(
        {
            "key": keys,
            "source": list(pool["source"]),
            "transform": list(pool["transform"]),
            "copy_of": [keys[c] if c >= 0 else "" for c in pool["copy_of"]],
            "contamination_of": pool["contamination_of"],
        }
    )
    buf = io.BytesIO()
    pq.write_table(gt, buf)
    gt_uri = join_uri(prefix, f"{split}_ground_truth.parquet")
    store.put_bytes(gt_uri, buf.getvalue())
    return uri, gt_uri


def make_data(store, prefix: str, a) -> dict:
    """Write (once per prefix) the evaluation set, both pools and the Fashion-MNIST sets."""
    import numpy as np

    from dinoflow.data.edits import FAMILIES, TRAIN_FAMILIES
    from dinoflow.data.idx import load_fashion_mnist
    from dinoflow.storage.client import join_uri
    from dinoflow_tools.pool import _write_set, build_pool_arrays

    info_uri = join_uri(prefix, "data.json")
    if store.exists(info_uri):
        return store.get_json(info_uri)
    t0 = time.perf_counter()
    p = build_pool_arrays(
        a.pool_size + a.val_pool_size,
        dup_fraction=0.0,
        contamination=0,
        eval_size=a.eval_size,
        seed_size=0,
        seed=a.seed,
    )
    half = a.eval_size // 2
    test_base, val_base = slice(0, a.pool_size), slice(a.pool_size, a.pool_size + a.val_pool_size)
    test = plant(
        p.images[test_base],
        p.source[test_base],
        p.eval_images,
        np.arange(half, a.eval_size),
        list(FAMILIES),
        a.dup_per_family,
        a.contam_per_family,
        a.seed + 1,
    )
    val = plant(
        p.images[val_base],
        p.source[val_base],
        p.eval_images,
        np.arange(half),
        list(TRAIN_FAMILIES),
        a.val_dup_per_family,
        a.val_contam_per_family,
        a.seed + 2,
    )
    info = {"families": list(FAMILIES), "seen": list(TRAIN_FAMILIES)}
    info["test_manifest_uri"], info["test_gt_uri"] = _write_pool(store, prefix, test, "test")
    info["val_manifest_uri"], info["val_gt_uri"] = _write_pool(store, prefix, val, "val")
    ne = len(p.eval_images)
    info["eval_manifest_uri"] = _write_set(
        store, join_uri(prefix, "eval"), p.eval_images, ["fashion_mnist"] * ne, p.eval_labels, "eval", 10_000
    )[0]
    tr_x, tr_y = load_fashion_mnist("train")
    te_x, te_y = load_fashion_mnist("test")
    tr_x, tr_y = tr_x[: a.fmnist_train], tr_y[: a.fmnist_train]
    for name, x, y in (("fm_train", tr_x, tr_y), ("fm_test", te_x, te_y)):
        info[f"{name}_manifest_uri"] = _write_set(
            store, join_uri(prefix, name), x, ["fashion_mnist"] * len(x), y, name, 10_000
        )[0]
    info["sizes"] = {"test_pool": len(test["images"]), "val_pool": len(val["images"]), "eval": ne}
    info["data_seconds"] = round(time.perf_counter() - t0, 1)
    store.put_json(info_uri, info)
    return info


# -- embedders ------------------------------------------------------------------------------------
SETS = ("test", "val", "eval", "fm_train", "fm_test")


def _pixel(store, manifest_uri: str, out: str) -> str:
    from dinoflow.curation.descriptors import pixel_descriptor
    from dinoflow.curation.hashing import phash64, reduce_for_hash
    from dinoflow.data.dataset import load_images
    from dinoflow.data.embeddings import write_embeddings
    from dinoflow.storage.client import join_uri

    if not store.exists(join_uri(out, "embeddings.json")):
        x, _ = load_images(store, manifest_uri, channels=1)
        x = x[:, 0].numpy()
        write_embeddings(store, out, pixel_descriptor(x), phash=phash64(reduce_for_hash(x)))
    return out


def train_descriptor(store, prefix: str, data: dict, a) -> dict:
    """The pretrain stage with ``method: sscd`` on the test pool's own images."""
    from dinoflow.stages import get_stage
    from dinoflow.storage.client import join_uri

    fields = json.loads(json.dumps(SSCD_CPU))
    fields["backbone"] = a.backbone
    fields["steps"] = a.steps
    fields["batch_size"] = a.batch_size
    fields["seed"] = a.seed
    fields["data"] = {"workers": a.workers}
    # the whole recipe names the run (the stage resumes from a checkpoint under the same URI)
    recipe = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
    tag = f"{a.backbone}-s{a.steps}-b{a.batch_size}-seed{a.seed}-{recipe}"
    stage = get_stage("pretrain")
    spec = stage.parse_spec(
        {**fields, "output_uri": join_uri(prefix, f"sscd-{tag}"), "manifest_uri": data["test_manifest_uri"]}
    )
    t0 = time.perf_counter()
    res = stage.run(spec, store)
    return {
        "backbone_uri": res.backbone_uri,
        # the stage's own figure: a finished run found in the store is reused with its original time
        "train_seconds": round(res.seconds or time.perf_counter() - t0, 1),
        "final_loss": res.final_loss,
        "steps": res.steps,
        "train_images": res.n_images,
        "curves_uri": res.curves_uri,
        "resumed_from_step": res.resumed_from_step,
        "tag": tag,
    }


def embed_all(store, prefix: str, data: dict, embedder: str, a, backbone_uri: str | None, label: str) -> dict:
    """Embeddings of every set with one embedder; the test pool's embed seconds."""
    from dinoflow.stages import get_stage
    from dinoflow.storage.client import join_uri

    from ._pool import default_workers

    out: dict = {}
    stage = get_stage("embed")
    for name in SETS:
        uri = join_uri(prefix, f"emb-{label}", name)
        t0 = time.perf_counter()
        if embedder == "pixel":
            out[name] = _pixel(store, data[f"{name}_manifest_uri"], uri)
        else:
            fields = {
                "output_uri": uri,
                "manifest_uri": data[f"{name}_manifest_uri"],
                "backbone_uri": backbone_uri,
                "num_workers": default_workers(),
            }
            if embedder == "learned":  # the descriptor as the method trained it
                fields["features"] = SSCD_CPU["sscd"].get("features", "cls")
            if backbone_uri is None:  # the bootstrap pretrain on a sample of the test pool
                fields |= {"bootstrap_steps": a.bootstrap_steps, "bootstrap_sample": a.bootstrap_sample}
            res = stage.run(stage.parse_spec(fields), store)
            backbone_uri = res.backbone_uri
            out[name] = res.embeddings_uri
            out[f"{name}_seconds"] = round(res.seconds, 2)  # a reused run keeps its original time
            continue
        out[f"{name}_seconds"] = round(time.perf_counter() - t0, 2)
    out["backbone_uri"] = backbone_uri
    return out


# -- thresholds and scores ------------------------------------------------------------------------
def _spec_fields(data: dict, emb: dict, embedder: str, pool: str, a, descriptor: dict | None) -> dict:
    fields = {
        "manifest_uri": data[f"{pool}_manifest_uri"],
        "embeddings_uri": emb[pool],
        "eval_manifest_uris": [data["eval_manifest_uri"]],
        "eval_embeddings_uris": [emb["eval"]],
        "k": a.k,
        "center": CENTER[embedder],
        "grouping": a.grouping,
        "max_removed_fraction": 1.0,
        "copy_detection": {"enabled": embedder != "learned" and a.baseline_copy_detection == "on"},
    }
    if descriptor is not None:  # dedup on the copy descriptor; the pool's other embeddings ride along
        fields["copy_descriptor"] = {
            "embeddings_uri": descriptor[pool],
            "eval_embeddings_uris": [descriptor["eval"]],
        }
        # candidates from the descriptor alone: equal 64-bit perceptual hashes of 28 px images pair up
        # distinct images (on the v1 test pool 477 of its 665 hash-equal pairs are not copies)
        fields["phash_max_bits"] = -1
    return fields


# thresholds swept on the validation pool: coarse below 0.9, fine above (the pixel descriptor lives there)
GRID = sorted(
    {round(0.3 + 0.02 * i, 4) for i in range(31)}
    | {round(0.9 + 0.0025 * i, 4) for i in range(40)}
    | {0.999, 0.9995}
)
# decontamination rules swept on the validation pool: (decontam_margin_rank, decontam_margin_weight);
# (0, 0): the plain nearest-evaluation cosine. Margin scores sit lower, on their own grid.
MARGINS = ((0, 0.0), (2, 0.5), (2, 1.0), (4, 1.0), (10, 1.0))
MARGIN_GRID = sorted({round(-0.1 + 0.01 * i, 4) for i in range(111)} | set(GRID))


def choose_thresholds(store, prefix: str, data: dict, fields: dict, label: str, a) -> dict:
    """Sweep both thresholds on the validation pool (one similarity graph, its edges kept down to the
    lowest threshold of the grid) and choose them."""
    import numpy as np

    from dinoflow.data.manifest import read_manifest
    from dinoflow.stages import get_stage
    from dinoflow.stages.dedup import decide, load_inputs, similarity_graph
    from dinoflow.storage.client import join_uri
    from dinoflow_tools.pool import read_ground_truth
    from dinoflow_tools.scoring import ground_truth_arrays, score_outcome

    stage = get_stage("dedup")
    out_uri = join_uri(prefix, f"sweep-{label}-{fields['grouping']}-k{fields['k']}")
    max_rank = max(r for r, _ in MARGINS)
    spec = stage.parse_spec(
        {**fields, "output_uri": out_uri, "threshold_cos": GRID[0], "decontam_margin_rank": max_rank}
    )
    table, _, evals = load_inputs(spec, store)
    sim = similarity_graph(spec, store, table, evals)
    keys = read_manifest(store, data["val_manifest_uri"]).column("key").to_pylist()
    g = ground_truth_arrays(read_ground_truth(store, data["val_gt_uri"]), keys)

    def score(t: float, d: float, rank: int = 0, weight: float = 0.0) -> dict:
        update = {"threshold_cos": t, "decontam_threshold_cos": d}
        update |= {"decontam_margin_rank": rank, "decontam_margin_weight": weight}
        return score_outcome(g, decide(spec.model_copy(update=update), table, sim))

    def pick(rows: list[tuple[float, dict]], p_key: str, r_key: str, target: float) -> tuple[float, bool]:
        ok = [(s[r_key], t) for t, s in rows if s[p_key] >= target and s[r_key] > 0]
        if ok:
            return max(ok)[1], True
        return max(rows, key=lambda ts: (ts[1][p_key], ts[0]))[0], False  # best precision reached

    dup_rows = [(t, score(t, 1.0)) for t in GRID]
    t_dup, dup_met = pick(dup_rows, "dup_precision", "dup_recall", a.target_dup_precision)
    sweep, scored = [], []  # per decontamination rule: its best threshold at the precision target
    for rank, weight in MARGINS:
        con_rows = [(d, score(t_dup, d, rank, weight)) for d in (MARGIN_GRID if rank else GRID)]
        t_con, con_met = pick(
            con_rows, "contamination_precision", "contamination_recall", a.target_contam_precision
        )
        got = score(t_dup, t_con, rank, weight)
        scored.append(got)
        sweep.append(
            {
                "decontam_margin_rank": rank,
                "decontam_margin_weight": weight,
                "decontam_threshold_cos": t_con,
                "contam_target_met": con_met,
                "val_contamination_precision": got["contamination_precision"],
                "val_contamination_recall": got["contamination_recall"],
            }
        )
    # the rule with the best validation recall at the target (ties: the plainer rule, listed first)
    i = max(
        range(len(sweep)),
        key=lambda i: (
            sweep[i]["contam_target_met"],
            sweep[i]["val_contamination_recall"],
            sweep[i]["val_contamination_precision"],
        ),
    )
    best, final = sweep[i], scored[i]
    return {
        "threshold_cos": t_dup,
        "decontam_threshold_cos": best["decontam_threshold_cos"],
        "decontam_margin_rank": best["decontam_margin_rank"],
        "decontam_margin_weight": best["decontam_margin_weight"],
        "margin_sweep": sweep,
        "dup_target_met": dup_met,
        "contam_target_met": best["contam_target_met"],
        "val_dup_precision": final["dup_precision"],
        "val_dup_recall": final["dup_recall"],
        "val_contamination_precision": final["contamination_precision"],
        "val_contamination_recall": final["contamination_recall"],
        "val_copies": int(np.sum(g["copy_of"] >= 0)),
        "val_contamination": int(g["contam"].sum()),
    }


def group_scores(g: dict, o: dict, families: list[str]) -> dict:
    """Duplicate and contamination precision/recall of the copies whose family is in ``families``;
    wrong removals of non-copies count against every group (see the module doc)."""
    import numpy as np

    from dinoflow_tools.scoring import DUP_RULES

    copy_of, fam, contam = g["copy_of"], g["transform"], g["contam"]
    n = len(copy_of)
    family_id = np.where(copy_of >= 0, copy_of, np.arange(n))
    is_copy = copy_of >= 0
    in_g = np.isin(fam, families)
    linked = is_copy & (o["group"] == o["group"][np.maximum(copy_of, 0)])
    removed = np.isin(o["reason"], DUP_RULES)
    correct = removed & (o["rep"] >= 0) & (family_id == family_id[np.maximum(o["rep"], 0)])
    wrong_other = int((removed & ~correct & ~is_copy).sum())
    tp = int((correct & is_copy & in_g).sum())
    wrong_g = int((removed & ~correct & is_copy & in_g).sum())
    dropped = o["reason"] == "contamination"
    c_g = contam & in_g
    c_tp = int((dropped & c_g).sum())
    c_false = int((dropped & ~contam).sum())
    d_g = is_copy & in_g
    return {
        "dup_recall": round(float(linked[d_g].mean()) if d_g.any() else 0.0, 4),
        "dup_precision": round(tp / max(1, tp + wrong_g + wrong_other), 4),
        "contamination_recall": round(float((~o["kept"][c_g]).mean()) if c_g.any() else 0.0, 4),
        "contamination_precision": round(c_tp / max(1, c_tp + c_false), 4),
        "dup_copies": int(d_g.sum()),
        "contamination_copies": int(c_g.sum()),
        "wrong_removals_of_clean_images": wrong_other,
        "false_contamination_drops": c_false,
    }


def per_family(g: dict, o: dict, families: list[str]) -> dict:
    """Recall of each family's duplicate and contamination copies, and the link precision of its
    removed duplicates (removed copies linked to their own original)."""
    import numpy as np

    from dinoflow_tools.scoring import DUP_RULES

    copy_of, fam, contam = g["copy_of"], g["transform"], g["contam"]
    is_copy = copy_of >= 0
    linked = is_copy & (o["group"] == o["group"][np.maximum(copy_of, 0)])
    removed = np.isin(o["reason"], DUP_RULES)
    rows = {}
    for f in families:
        d = is_copy & (fam == f)
        c = contam & (fam == f)
        rem = removed & d
        rows[f] = {
            "dup_recall": round(float(linked[d].mean()), 4) if d.any() else None,
            "dup_link_precision": round(float(linked[rem].mean()), 4) if rem.any() else None,
            "contamination_recall": round(float((~o["kept"][c]).mean()), 4) if c.any() else None,
        }
    return rows


def test_run(store, prefix: str, data: dict, fields: dict, thr: dict, label: str) -> dict:
    """The dedup stage on the test pool at the chosen thresholds, scored per group and family."""
    import io

    import pyarrow.parquet as pq

    from dinoflow.data.manifest import read_manifest
    from dinoflow.stages import get_stage
    from dinoflow.storage.client import join_uri
    from dinoflow_tools.pool import read_ground_truth
    from dinoflow_tools.scoring import ground_truth_arrays, outcome_arrays

    stage = get_stage("dedup")
    t, d = thr["threshold_cos"], thr["decontam_threshold_cos"]
    r, w = thr["decontam_margin_rank"], thr["decontam_margin_weight"]
    spec = stage.parse_spec(
        {
            **fields,
            "output_uri": join_uri(prefix, f"dedup-{label}-t{t}-d{d}-m{r}x{w}-{fields['grouping']}"),
            "threshold_cos": t,
            "decontam_threshold_cos": d,
            "decontam_margin_rank": r,
            "decontam_margin_weight": w,
        }
    )
    t0 = time.perf_counter()
    res = stage.run(spec, store)
    secs = time.perf_counter() - t0
    keys = read_manifest(store, data["test_manifest_uri"]).column("key").to_pylist()
    kept = read_manifest(store, res.manifest_uri).column("key").to_pylist()
    groups = pq.read_table(io.BytesIO(store.get_bytes(res.groups_uri)))
    g = ground_truth_arrays(read_ground_truth(store, data["test_gt_uri"]), keys)
    o = outcome_arrays(keys, kept, groups)
    seen, held = data["seen"], [f for f in data["families"] if f not in data["seen"]]
    return {
        "seen": group_scores(g, o, seen),
        "heldout": group_scores(g, o, held),
        "families": per_family(g, o, data["families"]),
        "dedup_seconds": round(res.seconds or secs, 2),
        "stage_seconds": res.seconds,
        "kept": res.kept_count,
        "removed_per_rule": res.removed_per_rule,
    }


def fmnist_flagged(store, emb: dict, embedder: str, thr: dict) -> float:
    """Share of Fashion-MNIST train images the dedup stage's cosine decontamination rule (``thr``:
    threshold and margin) flags against the 10k test images; no planted copies."""
    from dinoflow.curation import knn
    from dinoflow.curation.dedup import margin_scores
    from dinoflow.curation.descriptors import l2_normalize
    from dinoflow.data.embeddings import read_embeddings

    tr, _ = read_embeddings(store, emb["fm_train"])
    te, _ = read_embeddings(store, emb["fm_test"])
    if CENTER[embedder]:
        mean = tr.mean(0, keepdims=True)
        tr, te = tr - mean, te - mean
    rank, weight = thr["decontam_margin_rank"], thr["decontam_margin_weight"]
    res = knn.knn_search(l2_normalize(te), l2_normalize(tr), rank + 1)
    score = margin_scores(res.sims, rank, weight)  # the dedup stage's rule
    return round(float((score > thr["decontam_threshold_cos"]).mean()), 5)


def plain_rule(
    store, prefix, data, fields, thr: dict, label: str, emb: dict, embedder: str, res: dict
) -> dict:
    """The test figures of the plain nearest-evaluation cosine rule at its own validation threshold
    (the first rule of the sweep), to set beside the chosen rule's: what the margin changed."""
    plain = thr["margin_sweep"][0]
    t = {
        **thr,
        **{k: plain[k] for k in ("decontam_threshold_cos", "decontam_margin_rank", "decontam_margin_weight")},
    }
    if (t["decontam_margin_rank"], t["decontam_threshold_cos"]) != (
        thr["decontam_margin_rank"],
        thr["decontam_threshold_cos"],
    ):
        res = test_run(store, prefix, data, fields, t, label)
    return {
        "decontam_threshold_cos": t["decontam_threshold_cos"],
        **{
            f"{g}_contamination_{m}": res[g][f"contamination_{m}"]
            for g in ("heldout", "seen")
            for m in ("recall", "precision")
        },
        "fmnist_train_flagged_fraction": fmnist_flagged(store, emb, embedder, t),
    }


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="dinoflow bench copy-detection", description=__doc__)
    ap.add_argument("--pool-size", type=int, default=10_000, help="base images of the test pool")
    ap.add_argument("--val-pool-size", type=int, default=5_000, help="base images of the validation pool")
    ap.add_argument(
        "--eval-size", type=int, default=2_000, help="Fashion-MNIST test images decontaminated against"
    )
    ap.add_argument("--dup-per-family", type=int, default=40)
    ap.add_argument("--contam-per-family", type=int, default=30)
    ap.add_argument("--val-dup-per-family", type=int, default=30)
    ap.add_argument("--val-contam-per-family", type=int, default=20)
    ap.add_argument(
        "--fmnist-train", type=int, default=60_000, help="train images checked against the 10k test"
    )
    ap.add_argument("--backbone", default=SSCD_CPU["backbone"])
    ap.add_argument("--steps", type=int, default=SSCD_CPU["steps"])
    ap.add_argument("--batch-size", type=int, default=SSCD_CPU["batch_size"])
    ap.add_argument("--workers", type=int, default=1, help="training DataLoader workers")
    ap.add_argument("--bootstrap-steps", type=int, default=300, help="the SSL baseline's bootstrap pretrain")
    ap.add_argument("--bootstrap-sample", type=int, default=10_000)
    ap.add_argument("--embedders", default=",".join(EMBEDDERS))
    ap.add_argument("--baseline-copy-detection", choices=["on", "off"], default="on")
    ap.add_argument("--target-dup-precision", type=float, default=0.98)
    ap.add_argument("--target-contam-precision", type=float, default=0.95)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--grouping", choices=["star", "connected"], default="star")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--prefix", default=None, help="s3:// prefix (default s3://bench-copydetect/<version+sizes>)"
    )
    a = ap.parse_args(argv)
    embedders = [e for e in a.embedders.split(",") if e]
    unknown = set(embedders) - set(EMBEDDERS)
    if unknown or "learned" not in embedders:
        ap.error(f"--embedders: 'learned' plus any of {EMBEDDERS}, got {a.embedders}")
    import faiss
    import torch

    from ._store import bench_store

    torch.set_num_threads(a.threads)
    faiss.omp_set_num_threads(a.threads)
    prefix = a.prefix or (
        f"s3://bench-copydetect/{VERSION}-p{a.pool_size}-v{a.val_pool_size}-e{a.eval_size}-d{a.dup_per_family}"
        f"-c{a.contam_per_family}-vd{a.val_dup_per_family}-vc{a.val_contam_per_family}-f{a.fmnist_train}-s{a.seed}"
    )
    results: dict = {}
    with bench_store() as store:
        data = make_data(store, prefix, a)
        trained = train_descriptor(store, prefix, data, a)
        # outputs of the learned descriptor are named by its recipe (a stage refuses to overwrite a
        # finished run with a different spec)
        label = {e: e for e in embedders} | {"learned": f"learned-{trained['tag']}"}
        emb = {
            "learned": embed_all(store, prefix, data, "learned", a, trained["backbone_uri"], label["learned"])
        }
        for e in embedders:
            if e != "learned":
                emb[e] = embed_all(store, prefix, data, e, a, None, label[e])
        for e in embedders:
            # the learned descriptor rides on the pixel embeddings (what curation would get), as a pipeline would
            desc = emb["learned"] if e == "learned" else None
            base = emb["pixel"] if e == "learned" and "pixel" in emb else emb[e]
            fields_val = _spec_fields(data, base, e, "val", a, desc)
            thr = choose_thresholds(store, prefix, data, fields_val, label[e], a)
            fields_test = _spec_fields(data, base, e, "test", a, desc)
            res = test_run(store, prefix, data, fields_test, thr, label[e])
            res["thresholds"] = thr
            res["fmnist_train_flagged_fraction"] = fmnist_flagged(store, emb[e], e, thr)
            res["embed_seconds_test_pool"] = emb[e]["test_seconds"]
            res["seconds_per_1k_images"] = round(
                1000 * (emb[e]["test_seconds"] + res["dedup_seconds"]) / data["sizes"]["test_pool"], 3
            )
            res["plain_rule"] = plain_rule(store, prefix, data, fields_test, thr, label[e], emb[e], e, res)
            results[e] = res
    _print(results, data, trained, embedders)
    learned = results["learned"]
    figures = {
        "heldout_contamination_recall": learned["heldout"]["contamination_recall"],
        "heldout_contamination_precision": learned["heldout"]["contamination_precision"],
        "heldout_dup_recall": learned["heldout"]["dup_recall"],
        "heldout_dup_precision": learned["heldout"]["dup_precision"],
        "seen_dup_recall": learned["seen"]["dup_recall"],
        "seen_dup_precision": learned["seen"]["dup_precision"],
        "seen_contamination_recall": learned["seen"]["contamination_recall"],
        "seen_contamination_precision": learned["seen"]["contamination_precision"],
        "fmnist_train_flagged_fraction": learned["fmnist_train_flagged_fraction"],
        "seconds_per_1k_images": learned["seconds_per_1k_images"],
    }
    print(
        json.dumps(
            {
                **figures,
                "thresholds": learned["thresholds"],
                "descriptor": {**trained, "backbone": a.backbone, "batch_size": a.batch_size},
                "sizes": data["sizes"],
                "fmnist_train_images": a.fmnist_train,
                "per_family": {e: results[e]["families"] for e in embedders},
                "baselines": {
                    e: {k: v for k, v in results[e].items() if k != "families"}
                    for e in embedders
                    if e != "learned"
                },
                "learned": {k: v for k, v in learned.items() if k != "families"},
            }
        )
    )


def _print(results: dict, data: dict, trained: dict, embedders: list[str]) -> None:
    print(
        f"test pool {data['sizes']['test_pool']} images, validation pool {data['sizes']['val_pool']}, "
        f"{data['sizes']['eval']} evaluation images; descriptor trained {trained['steps']} steps in "
        f"{trained['train_seconds']}s on {trained['train_images']} pool images"
    )
    head = "".join(f"{e[:9] + ' dup':>15}{e[:9] + ' con':>15}" for e in embedders)
    print(f"{'family':<17}{'':<5}{head}")
    for f in data["families"]:
        row = "".join(
            f"{_fmt(results[e]['families'][f]['dup_recall']):>15}{_fmt(results[e]['families'][f]['contamination_recall']):>15}"
            for e in embedders
        )
        print(f"{f:<17}{'seen' if f in data['seen'] else 'held':<5}{row}")
    for e in embedders:
        r = results[e]
        t = r["thresholds"]
        print(
            f"{e}: thresholds {t['threshold_cos']}/{t['decontam_threshold_cos']} (margin rank "
            f"{t['decontam_margin_rank']} x {t['decontam_margin_weight']}; validation dup P "
            f"{t['val_dup_precision']} R {t['val_dup_recall']}, contamination P {t['val_contamination_precision']} "
            f"R {t['val_contamination_recall']}); seen dup P {r['seen']['dup_precision']} R {r['seen']['dup_recall']}, "
            f"held-out dup P {r['heldout']['dup_precision']} R {r['heldout']['dup_recall']}, held-out contamination "
            f"P {r['heldout']['contamination_precision']} R {r['heldout']['contamination_recall']}; Fashion-MNIST "
            f"train flagged {r['fmnist_train_flagged_fraction']}; {r['seconds_per_1k_images']} s per 1k pool images"
        )
        q = r["plain_rule"]
        print(
            f"  {e} with the plain cosine rule (validation threshold {q['decontam_threshold_cos']}): held-out "
            f"contamination P {q['heldout_contamination_precision']} R {q['heldout_contamination_recall']}, "
            f"seen P {q['seen_contamination_precision']} R {q['seen_contamination_recall']}; Fashion-MNIST "
            f"train flagged {q['fmnist_train_flagged_fraction']}"
        )


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"
