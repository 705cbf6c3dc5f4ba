"""dedup: near-duplicate removal and test-set decontamination (DINOv2 Sec. 3).

Rules, strongest first: ``exact`` (same sha256 of the stored bytes), ``phash`` (perceptual hashes
within ``phash_max_bits``, mirror images included) and ``embedding`` (k-NN graph edges with cosine
above ``threshold_cos``). Each duplicate group keeps one image: the largest (pixel area), then the
earliest manifest row. Groups are ``star``s by default (every removed image is a direct duplicate
of the kept one; no chains) or DINOv2's ``connected`` components (see dinoflow.curation.dedup).
Decontamination: a pool image whose nearest evaluation image is above ``decontam_threshold_cos``
(or hash-equal to one), or that ``copy_detection`` verifies as an edited copy of one, is dropped
with its whole duplicate group.

Why ``copy_detection``: DINOv2 decontaminates with a copy-detection embedding (SSCD) and a cosine
of 0.45; such an embedding maps crops, rotations and overlaid captions next to their source. The
embeddings this stage is given (a pixel descriptor, a briefly bootstrapped SSL backbone) do not:
crop, rotation and caption copies of test images escaped them (demo pool: crop recall ~0, rotation
<= 0.15, text <= 0.57). The pass works on pixels, independently of the embedder: an evaluation
index expanded with canonical views (crops, rotations, mirror) proposes candidates, and an alignment
search with an error that ignores one occluder-sized window verifies them (dinoflow.curation.copydetect).

Outputs under ``output_uri``: ``manifest.parquet`` (kept rows, same shards), ``embeddings/`` (kept
rows' embeddings), ``groups.parquet`` (every row in a multi-image component or dropped for
contamination: key, group, representative key, reason) and ``report.json`` (counts per rule and
per source, the index choice and its reason).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dinoflow.errors import SpecError
from dinoflow.stages.base import StageResult, StageSpec

log = logging.getLogger(__name__)


class CopyDetectionSpec(BaseModel):
    """Pixel copy detection against the evaluation sets (dinoflow.curation.copydetect)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="verify crop/rotation/mirror/caption copies on pixels")
    px: int = Field(28, ge=8, le=128, description="working resolution (grayscale px x px)")
    max_error: float = Field(
        0.008,
        gt=0,
        description="a copy's robust residual (share of the pool image's variance) is at most this; "
        "measured: planted crop/rotate/caption copies <= 0.005, hardest distinct pairs >= 0.014",
    )
    candidate_cos: float = Field(0.85, gt=-1, lt=1, description="thumbnail correlation a candidate needs")
    k: int = Field(2, ge=1, le=16, description="candidate evaluation rows per pool image and region")
    occluder_frac: tuple[float, float] = Field(
        (0.33, 0.8), description="(height, width) share of the image an overlay may cover (ignored window)"
    )
    max_angle_deg: int = Field(15, ge=0, le=45, description="rotations searched: +-1..this many degrees")
    crop_min_frac: float = Field(0.68, gt=0.3, le=1, description="smallest crop side searched (share)")
    exact_max_views: int = Field(200_000, ge=1, description="larger expanded indexes use IVF")
    index_chunk_views: int = Field(
        500_000,
        ge=1,
        description="the expanded index is built and searched in chunks of at most this many views "
        "(whole evaluation images), results merged: bounds memory (~1.2 kB per view at desc_px 10) "
        "whatever the evaluation set's size, with results identical to one index",
    )

    def params(self):
        from dinoflow.curation.copydetect import CopyDetectParams

        return CopyDetectParams(
            px=self.px,
            max_error=self.max_error,
            candidate_cos=self.candidate_cos,
            k=self.k,
            occluder_frac=tuple(self.occluder_frac),
            max_angle_deg=self.max_angle_deg,
            crop_min_frac=self.crop_min_frac,
            exact_max_views=self.exact_max_views,
            index_chunk_views=self.index_chunk_views,
        )


class DedupSpec(StageSpec):
    manifest_uri: str = Field(..., description="pool manifest")
    embeddings_uri: str = Field(..., description="the pool's embeddings (embed stage output, row-aligned)")
    eval_manifest_uris: list[str] = Field(default_factory=list, description="sets to decontaminate against")
    eval_embeddings_uris: list[str] = Field(default_factory=list, description="their embeddings, same order")
    k: int = Field(64, ge=1, description="neighbours per image (DINOv2: 64)")
    threshold_cos: float = Field(0.6, gt=-1, le=1, description="self-dedup edge threshold (DINOv2: 0.6)")
    decontam_threshold_cos: float = Field(0.45, gt=-1, le=1, description="eval-copy threshold (DINOv2: 0.45)")
    copy_detection: CopyDetectionSpec = Field(
        default_factory=CopyDetectionSpec,
        description="pixel copy detection against the evaluation sets (crops, rotations, mirror, "
        "captions), on top of the embedding threshold",
    )
    max_removed_fraction: float = Field(
        0.95,
        gt=0,
        le=1,
        description="refuse to remove more than this share of the pool (a degenerate embedder)",
    )
    phash_max_bits: int = Field(
        0, ge=-1, le=16, description="perceptual-hash pass: max Hamming distance of 64 bits (-1: off)"
    )
    exact_hash: bool = Field(True, description="pass on identical content (sha256 of stored bytes)")
    grouping: Literal["star", "connected"] = Field(
        "star",
        description="star: each removed image is a direct duplicate of the kept one (no chaining); "
        "connected: DINOv2's connected components of the k-NN graph, which chain on dense pools",
    )
    center: bool = Field(
        False,
        description="subtract the pool's mean embedding before cosine (spreads the similarities "
        "of embedders not trained for copy detection)",
    )
    index: Literal["auto", "flat", "ivf"] = Field("auto", description="auto: exact up to exact_max_pool")
    exact_max_pool: int = Field(100_000, ge=1, description="largest pool searched exactly (IndexFlatIP)")
    nprobe: int | None = Field(None, ge=1, description="IVF lists probed per query (default min(nlist, 16))")

    @model_validator(mode="after")
    def _paired(self) -> DedupSpec:
        if len(self.eval_manifest_uris) != len(self.eval_embeddings_uris):
            raise ValueError(
                f"eval_manifest_uris ({len(self.eval_manifest_uris)}) and eval_embeddings_uris "
                f"({len(self.eval_embeddings_uris)}) must pair up one to one"
            )
        return self


class DedupResult(StageResult):
    manifest_uri: str = Field(..., description="kept manifest")
    embeddings_uri: str = Field(..., description="embeddings of the kept rows")
    groups_uri: str
    report_uri: str
    input_count: int
    kept_count: int
    removed_per_rule: dict[str, int] = Field(default_factory=dict)
    contaminated_count: int = 0
    index_kind: str = ""
    index_reason: str = ""


def _load_checked(store, manifest_uri: str, emb_uri: str, what: str):
    from dinoflow.data.embeddings import read_meta
    from dinoflow.data.manifest import read_manifest

    table = read_manifest(store, manifest_uri)
    if table.num_rows == 0:
        raise SpecError(f"dedup: {what} manifest {manifest_uri} is empty")
    meta = read_meta(store, emb_uri)
    if meta["count"] != table.num_rows:
        raise SpecError(
            f"dedup: {what} embeddings {emb_uri} hold {meta['count']} rows but manifest {manifest_uri} has "
            f"{table.num_rows}: embed this manifest first"
        )
    return table, meta


@dataclass
class SimilarityGraph:
    """What the thresholds act on (computed once; benches sweep thresholds over it)."""

    graph: object  # knn.KnnResult: each pool row's k nearest other rows
    hash_edges: dict  # rule -> (a, b) for the exact and phash rules
    eval_top1: object  # float32 [n]: cosine of each pool row's nearest evaluation image (-1: none)
    touched_hash: object  # bool [n]: hash-equal to an evaluation image
    phash: object  # uint64 [n, 2] or None
    touched_copy: object = None  # bool [n]: verified copy of an evaluation image (copy_detection)
    copy_report: dict | None = None


def similarity_graph(spec: DedupSpec, store, table, emb, evals) -> SimilarityGraph:
    """Hash edges, the embedding k-NN graph and each pool row's nearest evaluation cosine."""
    import numpy as np

    from dinoflow.curation import knn
    from dinoflow.curation.descriptors import l2_normalize
    from dinoflow.curation.hashing import exact_matches, exact_pairs, hash_pairs
    from dinoflow.data.embeddings import read_embeddings, read_phash

    n = table.num_rows
    mean = emb.mean(0, keepdims=True) if spec.center else None
    x = l2_normalize(emb - mean) if mean is not None else l2_normalize(emb)
    edges: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    sha = np.asarray(table.column("sha256").to_pylist(), dtype=object)
    if spec.exact_hash:
        edges["exact"] = exact_pairs(sha)
    ph = read_phash(store, spec.embeddings_uri)
    if spec.phash_max_bits >= 0 and ph is not None:
        i, j, _ = hash_pairs(ph, spec.phash_max_bits)
        edges["phash"] = (i, j)
    g = knn.knn_graph(x, spec.k, exact_max_pool=spec.exact_max_pool, force=spec.index, nprobe=spec.nprobe)
    top1 = np.full(n, -1.0, np.float32)
    touched = np.zeros(n, bool)
    for et, eu in evals:
        e_emb, _ = read_embeddings(store, eu)
        ex = l2_normalize(e_emb - mean) if mean is not None else l2_normalize(e_emb)
        # each pool row's nearest evaluation image (the eval set is the index, the pool the queries)
        res = knn.knn_search(
            ex, x, 1, exact_max_pool=spec.exact_max_pool, force=spec.index, nprobe=spec.nprobe
        )
        top1 = np.maximum(top1, res.sims[:, 0])
        touched |= exact_matches(sha, np.asarray(et.column("sha256").to_pylist(), dtype=object))
        e_ph = read_phash(store, eu)
        if spec.phash_max_bits >= 0 and ph is not None and e_ph is not None:
            pi, _, _ = hash_pairs(ph, spec.phash_max_bits, other=e_ph)
            touched[pi] = True
    copies, copy_report = copy_detection(spec, store, table, evals)
    return SimilarityGraph(g, edges, top1, touched, ph, copies, copy_report)


def copy_detection(spec: DedupSpec, store, table, evals):
    """bool [n] pool rows verified as copies of an evaluation image, and a report (None when off)."""
    import time

    import numpy as np

    from dinoflow.curation.copydetect import detect_copies
    from dinoflow.data.dataset import load_images

    cd = spec.copy_detection
    if not cd.enabled or not evals:
        return None, None
    t0 = time.perf_counter()
    params = cd.params()
    pool, _ = load_images(store, table, channels=1, size_px=cd.px)
    pool = pool[:, 0].numpy()
    log.info(
        "copy detection: %d pool images decoded at %d px in %.1fs", len(pool), cd.px, time.perf_counter() - t0
    )
    touched = np.zeros(len(pool), bool)
    per_set = []
    for et, eu in evals:
        ev, _ = load_images(store, et, channels=1, size_px=cd.px)
        m = detect_copies(pool, ev[:, 0].numpy(), params)
        touched |= m.is_copy
        per_set.append(
            {
                "embeddings_uri": eu,
                "eval_images": int(len(ev)),
                "candidates": m.n_candidates,
                "copies": int(m.is_copy.sum()),
                "copies_per_alignment": m.alignment_counts(),
                "index": m.index_reason,
                "seconds": m.seconds,
            }
        )
    report = {
        "copies": int(touched.sum()),
        "seconds": round(time.perf_counter() - t0, 3),
        "max_error": cd.max_error,
        "per_eval_set": per_set,
    }
    return touched, report


def load_inputs(spec: DedupSpec, store):
    """Validated pool table, embedding metadata and evaluation (table, embeddings uri) pairs."""
    table, meta = _load_checked(store, spec.manifest_uri, spec.embeddings_uri, "pool")
    n = table.num_rows
    if spec.k >= n:
        raise SpecError(f"dedup: k={spec.k} neighbours needs a pool larger than k, the pool has {n} images")
    evals = []
    for mu, eu in zip(spec.eval_manifest_uris, spec.eval_embeddings_uris, strict=True):
        et, em = _load_checked(store, mu, eu, "evaluation")
        if em["dim"] != meta["dim"]:
            raise SpecError(
                f"dedup: evaluation embeddings {eu} are {em['dim']}-d but the pool's are {meta['dim']}-d: "
                "embed both with the same backbone"
            )
        evals.append((et, eu))
    return table, meta, evals


RULES = ("exact", "phash", "embedding", "contamination")


def decide(spec: DedupSpec, table, sim: SimilarityGraph):
    """Apply the thresholds to the similarity graph: a ``dinoflow.curation.dedup`` outcome (which rows
    stay, each row's group and reason). Refuses to remove more than ``max_removed_fraction``."""
    import numpy as np

    from dinoflow.curation import knn
    from dinoflow.curation.dedup import dedup

    n = table.num_rows
    edges = dict(sim.hash_edges)
    q, nb, _ = knn.edges_above(sim.graph, spec.threshold_cos)
    edges["embedding"] = (q, nb)
    # decontamination: a pool image touches an eval set by hash, by its nearest eval cosine, or as a copy
    touched = sim.touched_hash | (sim.eval_top1 > spec.decontam_threshold_cos)
    if sim.touched_copy is not None:
        touched |= sim.touched_copy
    area = np.asarray(table.column("width").to_numpy(zero_copy_only=False), np.int64) * np.asarray(
        table.column("height").to_numpy(zero_copy_only=False), np.int64
    )
    out = dedup(n, edges, area=area, touched_eval=np.flatnonzero(touched), grouping=spec.grouping)
    removed_share = 1.0 - float(out.keep.sum()) / n
    if removed_share > spec.max_removed_fraction:
        by_rule = {r: int((out.reason == r).sum()) for r in RULES}
        raise SpecError(
            f"dedup would remove {n - int(out.keep.sum())} of {n} pool images ({removed_share:.0%} > "
            f"max_removed_fraction {spec.max_removed_fraction}; by rule {by_rule}): the embedder does not "
            "separate images at threshold_cos / decontam_threshold_cos; use a better-trained embedder "
            "or higher thresholds (nothing was written)"
        )
    return out


def _write_kept(spec: DedupSpec, store, table, emb, meta, phash, out) -> tuple[str, str]:
    """The kept manifest (same shards) and the kept rows' embeddings; returns both URIs."""
    import numpy as np
    import pyarrow as pa

    from dinoflow.data.embeddings import write_embeddings
    from dinoflow.data.manifest import write_manifest

    keep_rows = np.flatnonzero(out.keep)
    manifest_uri = spec.out("manifest.parquet")
    write_manifest(store, manifest_uri, table.take(pa.array(keep_rows)))
    emb_out = spec.out("embeddings")
    write_embeddings(
        store,
        emb_out,
        emb[keep_rows],
        phash=None if phash is None else phash[keep_rows],
        meta={
            "manifest_uri": manifest_uri,
            "backbone_uri": meta.get("backbone_uri"),
            "features": meta.get("features"),
            "parent": spec.embeddings_uri,
        },
    )
    return manifest_uri, emb_out


def _write_groups(spec: DedupSpec, store, table, out) -> str:
    """Every row in a multi-image group or dropped for contamination, with its representative."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = np.asarray(table.column("key").to_pylist(), dtype=object)
    listed = np.flatnonzero((np.bincount(out.labels)[out.labels] > 1) | (out.reason == "contamination"))
    groups = pa.table(
        {
            "key": keys[listed].tolist(),
            "group": out.labels[listed],
            "representative": [keys[r] if r >= 0 else "" for r in out.representative[listed]],
            "reason": out.reason[listed].tolist(),
        }
    )
    buf = io.BytesIO()
    pq.write_table(groups, buf)
    uri = spec.out("groups.parquet")
    store.put_bytes(uri, buf.getvalue())
    return uri


def build_report(spec: DedupSpec, table, out, sim: SimilarityGraph) -> dict:
    """Counts per rule and per source, the index choice and the thresholds (``report.json``)."""
    import numpy as np

    n = table.num_rows
    g = sim.graph
    sources = np.asarray(table.column("source").to_pylist(), dtype=object)
    removed = {r: int((out.reason == r).sum()) for r in RULES}
    per_source = {}
    for s in sorted(set(sources.tolist())):
        m = sources == s
        per_source[s] = {
            "input": int(m.sum()),
            "kept": int((m & out.keep).sum()),
            **{r: int((m & (out.reason == r)).sum()) for r in removed},
        }
    return {
        "input_count": n,
        "kept_count": int(out.keep.sum()),
        "components": out.n_components,
        "duplicate_groups": int((np.bincount(out.labels) > 1).sum()),
        "removed_per_rule": removed,
        "edges_per_rule": out.edges_per_rule,
        "per_source": per_source,
        "index": {"kind": g.choice.kind, "reason": g.choice.reason, "gpu": g.on_gpu},
        "keep_rule": "largest pixel area, then earliest manifest row",
        "grouping": spec.grouping,
        "decontamination_rule": "pool images whose nearest evaluation image is above "
        "decontam_threshold_cos (or hash-equal, or a verified pixel copy), with their whole duplicate group",
        "copy_detection": sim.copy_report,
        "thresholds": {
            "threshold_cos": spec.threshold_cos,
            "decontam_threshold_cos": spec.decontam_threshold_cos,
            "k": spec.k,
            "phash_max_bits": spec.phash_max_bits,
            "center": spec.center,
        },
    }


def run(spec: DedupSpec, store) -> DedupResult:
    from dinoflow.data.embeddings import read_embeddings
    from dinoflow.metrics import IMAGES_PROCESSED

    table, meta, evals = load_inputs(spec, store)  # everything validated before any heavy work
    n = table.num_rows
    emb, _ = read_embeddings(store, spec.embeddings_uri)
    sim = similarity_graph(spec, store, table, emb, evals)
    out = decide(spec, table, sim)
    manifest_uri, emb_out = _write_kept(spec, store, table, emb, meta, sim.phash, out)
    groups_uri = _write_groups(spec, store, table, out)
    report = build_report(spec, table, out, sim)
    report_uri = spec.out("report.json")
    store.put_json(report_uri, report)
    IMAGES_PROCESSED.labels("dedup").inc(n)
    log.info("dedup: kept %d of %d (%s)", report["kept_count"], n, report["removed_per_rule"])
    return DedupResult(
        output_uri=spec.output_uri,
        manifest_uri=manifest_uri,
        embeddings_uri=emb_out,
        groups_uri=groups_uri,
        report_uri=report_uri,
        input_count=n,
        kept_count=report["kept_count"],
        removed_per_rule=report["removed_per_rule"],
        contaminated_count=out.contaminated_rows,
        index_kind=sim.graph.choice.kind,
        index_reason=sim.graph.choice.reason,
    )
