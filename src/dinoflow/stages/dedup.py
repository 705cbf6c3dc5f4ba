"""dedup: near-duplicate removal and test-set decontamination (DINOv2 Sec. 3).

Rules, strongest first: ``exact`` (same sha256 of the stored bytes), ``phash`` (perceptual hashes
within ``phash_max_bits``, mirror images included) and ``embedding`` (k-NN graph edges with cosine
above ``threshold_cos``). Each duplicate group keeps one image: the largest (pixel area), then the
earliest manifest row. Groups are ``star``s by default (every removed image is a direct duplicate
of the kept one; no chains) or DINOv2's ``connected`` components (see dinoflow.curation.dedup).
Decontamination: a pool image whose nearest evaluation image is above ``decontam_threshold_cos``
(or hash-equal to one: sha256, and the perceptual hash unless ``phash_decontaminates`` is off), or
that ``copy_detection`` verifies as an edited copy of one (geometric/caption alignment, or a global
blur/JPEG/brightness edit), is dropped with its whole duplicate group.

Why ``copy_detection``: DINOv2 decontaminates with a copy-detection embedding (SSCD) and a cosine
of 0.45; such an embedding maps crops, rotations and overlaid captions next to their source. The
embeddings this stage is given (a pixel descriptor, a briefly bootstrapped SSL backbone) do not:
crop, rotation and caption copies of test images escaped them (demo pool: crop recall ~0, rotation
<= 0.15, text <= 0.57). The pass works on pixels, independently of the embedder: an evaluation
index expanded with canonical views (crops, rotations, mirror) proposes candidates, and an alignment
search with an error that ignores one occluder-sized window verifies them (dinoflow.curation.copydetect).

Outputs under ``output_uri``: ``manifest.parquet`` (kept rows, same shards), ``embeddings/`` (kept
rows' embeddings), ``groups.parquet`` (every row in a multi-image component or dropped for
contamination: key, group, representative key, reason; for contamination the rule that fired
(``contamination_rule``: exact, phash, cosine, copy, or group with ``touched_by`` the member that
touched), the evaluation image matched (``eval_manifest``, ``eval_key``) and the row's nearest
evaluation cosine and copy error) and ``report.json`` (counts per rule and per source, the index
choice and its reason).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dinoflow.errors import SpecError
from dinoflow.stages import _fanout
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
    global_max_error: float = Field(
        0.012,
        ge=0,
        description="a candidate is also a copy when a global edit of the evaluation image (mirror, "
        "Gaussian blur, brightness/contrast; both low-passed) leaves at most this share of the pool "
        "image's variance unexplained (0: off); measured on a 20k demo pool (seed 1): planted blur "
        "copies <= 0.0024, JPEG 95 % <= 0.010, brightness 95 % <= 0.0073; distinct Fashion-MNIST pairs "
        ">= 0.0215, planted copies of other pool images >= 0.0148",
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
            global_max_error=self.global_max_error,
            candidate_cos=self.candidate_cos,
            k=self.k,
            occluder_frac=tuple(self.occluder_frac),
            max_angle_deg=self.max_angle_deg,
            crop_min_frac=self.crop_min_frac,
            exact_max_views=self.exact_max_views,
            index_chunk_views=self.index_chunk_views,
        )


class CopyDescriptorSpec(BaseModel):
    """Dedup and decontaminate on a copy descriptor (``dinoflow.methods.sscd``: the pretrain stage with
    ``method: sscd``, then the embed stage with that backbone) instead of ``embeddings_uri``.
    ``threshold_cos`` and ``decontam_threshold_cos`` then apply to descriptor cosines, the pixel
    ``copy_detection`` pass does not run (candidates come from the descriptor alone), and the kept
    rows' ``embeddings_uri`` vectors are still what the stage writes out (for curation)."""

    model_config = ConfigDict(extra="forbid")

    embeddings_uri: str = Field(
        ..., description="the pool's copy descriptors (row-aligned with manifest_uri)"
    )
    eval_embeddings_uris: list[str] = Field(
        default_factory=list,
        description="the evaluation sets' copy descriptors, in eval_manifest_uris' order",
    )


class DedupSpec(StageSpec):
    manifest_uri: str = Field(..., description="pool manifest")
    embeddings_uri: str = Field(..., description="the pool's embeddings (embed stage output, row-aligned)")
    eval_manifest_uris: list[str] = Field(default_factory=list, description="sets to decontaminate against")
    eval_embeddings_uris: list[str] = Field(default_factory=list, description="their embeddings, same order")
    k: int = Field(64, ge=1, description="neighbours per image (DINOv2: 64)")
    threshold_cos: float = Field(0.6, gt=-1, le=1, description="self-dedup edge threshold (DINOv2: 0.6)")
    decontam_threshold_cos: float = Field(0.45, gt=-1, le=1, description="eval-copy threshold (DINOv2: 0.45)")
    decontam_margin_rank: int = Field(
        0,
        ge=0,
        le=64,
        description="0: the cosine rule compares a pool image's nearest-evaluation cosine with "
        "decontam_threshold_cos; r > 0: that cosine minus decontam_margin_weight x the cosine of its "
        "(r+1)-th nearest evaluation image, a score normalisation with the evaluation set as the "
        "background (SSCD, Pizzi et al. 2022, normalise with a background set's neighbours): an image "
        "close to many evaluation images (a plain product) scores low, a copy of one of them high",
    )
    decontam_margin_weight: float = Field(
        1.0, ge=0, le=1, description="the weight of the background cosine (decontam_margin_rank > 0)"
    )
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
    contamination_spread: Literal["group", "self"] = Field(
        "group",
        description="group: a pool image that touches an evaluation set is dropped with its whole "
        "duplicate group (DINOv2); self: only the touching images are dropped, the rest group without "
        "them (on Fashion-MNIST train vs test the groups more than doubled the removals)",
    )
    phash_decontaminates: bool = Field(
        True,
        description="a pool image within phash_max_bits of an evaluation image's perceptual hash is "
        "contamination; off: the phash pass only groups pool duplicates (a 64-bit pHash of a 28 px "
        "image collides across distinct Fashion-MNIST products: 32 of 11k clean train images of a "
        "demo pool matched a test image at 0 bits, none of them a copy)",
    )
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
    nlist: int | None = Field(
        None,
        ge=1,
        description="IVF lists (default: tuned with nprobe, from 4*sqrt(n) up to 16*sqrt(n) while more "
        "lists reach recall_target or make the search cheaper than their training costs)",
    )
    nprobe: int | None = Field(
        None, ge=1, description="IVF lists probed per query (default: the fewest that reach recall_target)"
    )
    recall_target: float = Field(
        0.95,
        gt=0,
        le=1,
        description="IVF: k-NN recall the chosen nprobe must reach on held-out pool rows (exact search); "
        "it must also find all their neighbours above threshold_cos, with a step of margin",
    )
    tune_queries: int = Field(1000, ge=10, description="IVF: held-out pool rows that nprobe is tuned on")
    parts: int = Field(
        1, ge=1, description="partitions of the pool (row ranges), each indexed and searched by its own task"
    )
    copy_descriptor: CopyDescriptorSpec | None = Field(
        None, description="compare copy descriptors (an sscd backbone's embeddings) instead of embeddings_uri"
    )

    @model_validator(mode="after")
    def _paired(self) -> DedupSpec:
        if len(self.eval_manifest_uris) != len(self.eval_embeddings_uris):
            raise ValueError(
                f"eval_manifest_uris ({len(self.eval_manifest_uris)}) and eval_embeddings_uris "
                f"({len(self.eval_embeddings_uris)}) must pair up one to one"
            )
        d = self.copy_descriptor
        if d is not None and len(d.eval_embeddings_uris) != len(self.eval_manifest_uris):
            raise ValueError(
                f"copy_descriptor.eval_embeddings_uris ({len(d.eval_embeddings_uris)}) must pair up one to "
                f"one with eval_manifest_uris ({len(self.eval_manifest_uris)})"
            )
        return self

    def vectors(self) -> tuple[str, list[str]]:
        """The pool's and the evaluation sets' vectors the k-NN graph and decontamination compare."""
        d = self.copy_descriptor
        if d is not None:
            return d.embeddings_uri, list(d.eval_embeddings_uris)
        return self.embeddings_uri, list(self.eval_embeddings_uris)


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
    nprobe: int = 0
    parts: int = 1


QUERY_BLOCK_ROWS = 65_536  # pool rows searched per step of a part (bounds its result arrays)


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
    d = spec.copy_descriptor
    if d is not None:  # the descriptors must cover the same rows, at one dimension
        _, dm = _load_checked(store, spec.manifest_uri, d.embeddings_uri, "pool copy-descriptor")
        for mu, du in zip(spec.eval_manifest_uris, d.eval_embeddings_uris, strict=True):
            _, em = _load_checked(store, mu, du, "evaluation copy-descriptor")
            if em["dim"] != dm["dim"]:
                raise SpecError(
                    f"dedup: copy descriptors {du} are {em['dim']}-d but the pool's are {dm['dim']}-d: "
                    "embed both with the same copy-descriptor backbone"
                )
    return table, meta, evals


# -- the k-NN graph, in phases (dinoflow.stages._fanout, dinoflow.curation.partition) ----------
def _normalized(x, mean):
    from dinoflow.curation.descriptors import l2_normalize

    return l2_normalize(x - mean) if mean is not None else l2_normalize(x)


def _mean(store, spec: DedupSpec):
    from dinoflow.data.embeddings import get_npy

    return get_npy(store, spec.out("plan", "mean.npy")) if spec.center else None


def plan(spec: DedupSpec, store) -> dict:
    """Once per run: check the inputs; for IVF choose the list count and nprobe for ``recall_target`` on
    held-out rows (:func:`~dinoflow.curation.partition.tune_ivf`: each count's quantizer trained on a
    sample without them), and assign every pool row its lists (``plan/``)."""
    import numpy as np

    from dinoflow.curation import knn
    from dinoflow.curation import partition as pt
    from dinoflow.data.embeddings import EmbeddingReader, put_npy, read_meta

    load_inputs(spec, store)
    vectors, _ = spec.vectors()
    meta = read_meta(store, vectors)
    n, d = int(meta["count"]), int(meta["dim"])
    reader = EmbeddingReader(store, vectors, meta)
    mean = None
    if spec.center:
        total = np.zeros(d, np.float64)
        for _, block in reader.blocks(QUERY_BLOCK_ROWS):
            total += block.sum(0, dtype=np.float64)
        mean = (total / n).astype(np.float32)[None]
        put_npy(store, spec.out("plan", "mean.npy"), mean)
    choice = knn.choose_index(n, d, exact_max_pool=spec.exact_max_pool, force=spec.index, nprobe=spec.nprobe)
    out = {"kind": choice.kind, "reason": choice.reason, "nlist": choice.nlist, "nprobe": 0, "tuning": []}
    out.update(count=n, dim=d, parts=spec.parts, gpu=pt.gpu_wanted())
    if choice.kind == "flat":
        log.info("dedup plan: %s", choice.reason)
        return out
    held = pt.held_out_rows(n, spec.tune_queries)
    trained: dict[int, int] = {}

    def train(nlist: int, init=None):
        sample = pt.coarse_sample(n, nlist, held)
        trained[nlist] = len(sample)
        return pt.train_coarse(_normalized(reader.take(sample), mean), nlist, init=init)

    if spec.nprobe is not None:  # nothing to tune: the spec's nprobe on the spec's (or the first) nlist
        nlist = spec.nlist or pt.nlist_ladder(n)[0]
        centroids, nprobe, tuning, sweep = train(nlist), spec.nprobe, [], []
    else:
        t = pt.tune_ivf(
            n,
            _normalized(reader.take(held), mean),
            lambda: ((lo, _normalized(b, mean)) for lo, b in reader.blocks(QUERY_BLOCK_ROWS)),
            lambda ids: _normalized(reader.take(ids), mean),
            train,
            spec.k,
            spec.recall_target,
            search_queries=n,
            query_rows=held,
            threshold=spec.threshold_cos,
            nlist=spec.nlist,
        )
        nlist, centroids, nprobe, tuning, sweep = t.nlist, t.centroids, t.nprobe, t.tuning, t.nlist_sweep
    put_npy(store, spec.out("plan", "centroids.npy"), centroids)
    how = "from the spec" if spec.nlist else f"tried {[r['nlist'] for r in sweep]}" if sweep else "4*sqrt(n)"
    reason = (
        f"{choice.reason.split('; nlist')[0]}; nlist={nlist} ({how}) trained on {trained[nlist]} rows; "
        f"nprobe={nprobe} ({'from the spec' if spec.nprobe else f'fewest reaching recall {spec.recall_target}'})"
    )
    log.info("dedup plan: %s; nprobe sweep %s", reason, tuning)
    for b, (_, block) in enumerate(reader.blocks(QUERY_BLOCK_ROWS)):
        _, lists = pt.assign(centroids, _normalized(block, mean), nprobe)
        put_npy(store, spec.out("plan", f"lists-{b:06d}.npy"), lists.astype(np.int32))
    out.update(reason=reason, nlist=int(nlist), nprobe=int(nprobe), tuning=tuning, nlist_sweep=sweep)
    return out


def _lists(store, spec: DedupSpec, lo: int, hi: int):
    """The precomputed IVF lists of pool rows ``[lo, hi)`` ([rows, nprobe], nearest first)."""
    import numpy as np

    from dinoflow.data.embeddings import get_npy

    parts = []
    for b in range(lo // QUERY_BLOCK_ROWS, (hi - 1) // QUERY_BLOCK_ROWS + 1):
        a = get_npy(store, spec.out("plan", f"lists-{b:06d}.npy"))
        s = b * QUERY_BLOCK_ROWS
        parts.append(a[max(lo, s) - s : min(hi, s + len(a)) - s])
    return np.concatenate(parts).astype(np.int64)


def _first_lists(store, spec: DedupSpec, n: int):
    """int64 [n]: every pool row's own (nearest) IVF list, read block by block from the plan."""
    import numpy as np

    from dinoflow.data.embeddings import get_npy

    out = np.empty(n, np.int64)
    for b in range(-(-n // QUERY_BLOCK_ROWS)):
        a = get_npy(store, spec.out("plan", f"lists-{b:06d}.npy"))
        out[b * QUERY_BLOCK_ROWS : b * QUERY_BLOCK_ROWS + len(a)] = a[:, 0]
    return out


def search_part(spec: DedupSpec, store, part: int, planned: dict) -> dict:
    """Part ``part``: index its share of the pool (shared quantizer; for IVF the rows of the whole
    lists it owns, else its row range), search every pool row against them, keep the candidate edges
    above ``threshold_cos``; its row range's nearest evaluation cosine and copy detection. Writes
    ``parts/part-NNNNN/*.npy``."""
    import numpy as np

    from dinoflow.curation import knn
    from dinoflow.curation.partition import PartitionIndex, list_parts, part_range
    from dinoflow.data.embeddings import EmbeddingReader, put_npy, read_embeddings

    n = planned["count"]
    lo, hi = part_range(n, spec.parts, part)
    vectors, eval_vectors = spec.vectors()
    reader = EmbeddingReader(store, vectors)
    if len(reader) != n:
        raise SpecError(f"dedup: embeddings {vectors} changed since the plan ({len(reader)} != {n})")
    mean = _mean(store, spec)
    x = _normalized(reader.rows(lo, hi), mean)
    where = spec.out("parts", f"part-{part:05d}")
    # each of its rows' nearest evaluation image (the evaluation set is the index, these rows the
    # queries): its cosine and its row in the evaluation sets concatenated in the spec's order
    top1 = np.full(hi - lo, -1.0, np.float32)
    top1_row = np.full(hi - lo, -1, np.int64)
    kk = spec.decontam_margin_rank + 1  # with a margin, the background cosines too
    topk = np.full((hi - lo, kk), -1.0, np.float32)
    offset = 0
    for eu in eval_vectors:
        ex = _normalized(read_embeddings(store, eu)[0], mean)
        res = knn.knn_search(
            ex,
            x,
            max(1, min(kk, len(ex))),
            exact_max_pool=spec.exact_max_pool,
            force=spec.index,
            nprobe=spec.nprobe,
        )
        sims = np.where(res.ids >= 0, res.sims, -1.0).astype(np.float32)
        better = sims[:, 0] > top1
        top1 = np.where(better, sims[:, 0], top1)
        top1_row = np.where(better & (res.ids[:, 0] >= 0), res.ids[:, 0] + offset, top1_row)
        topk = -np.sort(-np.concatenate([topk, sims], axis=1), axis=1)[:, :kk]  # over every set
        offset += len(ex)
    put_npy(store, f"{where}/eval_top1.npy", top1)
    put_npy(store, f"{where}/eval_top1_row.npy", top1_row)
    if kk > 1:
        put_npy(store, f"{where}/eval_topk.npy", topk)
    copies, copy_report = copy_detection_rows(spec, store, lo, hi)
    if copies is not None:
        put_npy(store, f"{where}/copies.npy", copies.is_copy)
        put_npy(store, f"{where}/copy_row.npy", copies.eval_row)
        put_npy(store, f"{where}/copy_error.npy", copies.error)
        put_npy(store, f"{where}/copy_global_error.npy", copies.global_error)
    coarse = _fanout.coarse_plan(spec, store, planned)
    owner = None
    if coarse.kind == "ivf":  # the part indexes the rows of the whole lists it owns (list_parts)
        first = _first_lists(store, spec, n)
        owner = list_parts(first, coarse.nlist, spec.parts)
        mine = np.flatnonzero(owner[first] == part)
        index = PartitionIndex(
            _normalized(reader.take(mine), mean), 0, coarse, own_lists=first[mine], ids=mine
        )
        del first
    else:
        index = PartitionIndex(x, lo, coarse)
    del x
    qs, js, ss = [], [], []
    for b, (qlo, block) in enumerate(reader.blocks(QUERY_BLOCK_ROWS)):
        probes = None
        if owner is not None:  # probes into other parts' lists are skipped (-1)
            probes = _lists(store, spec, qlo, qlo + len(block))
            probes = np.where(owner[probes] == part, probes, -1)
        # only edges above threshold_cos are kept (each row's k best, merged over the parts later)
        q, j, s = index.edges_above(_normalized(block, mean), qlo, spec.threshold_cos, spec.k, probes)
        qs.append(q)
        js.append(j)
        ss.append(s)
        log.debug("dedup part %d: query block %d searched", part, b)
    edges = {"q": np.concatenate(qs), "j": np.concatenate(js), "s": np.concatenate(ss).astype(np.float32)}
    for name, a in edges.items():
        put_npy(store, f"{where}/edges-{name}.npy", a)
    return {
        "rows": [lo, hi],
        "candidate_edges": int(len(edges["q"])),
        "gpu": index.on_gpu,
        "copy_detection": copy_report,
    }


@dataclass
class CopyRows:
    """Copy detection of pool rows ``[lo, hi)`` against every evaluation set."""

    is_copy: object  # bool [rows]: verified copy of an evaluation image
    eval_row: object  # int64 [rows]: best verified match, a row of the evaluation sets concatenated (-1)
    error: object  # float32 [rows]: best robust error of a geometric/occluder alignment (inf: none)
    global_error: object  # float32 [rows]: best global-edit error (inf: none or off)


def copy_detection_rows(spec: DedupSpec, store, lo: int, hi: int):
    """``CopyRows`` of pool rows ``[lo, hi)`` and a report (None, None when off or without
    evaluation sets)."""
    cd = spec.copy_detection
    if not cd.enabled or spec.copy_descriptor is not None or not spec.eval_manifest_uris or hi <= lo:
        return None, None
    import time

    import numpy as np

    from dinoflow.curation.copydetect import detect_copies  # imports torch: only when it runs
    from dinoflow.data.dataset import load_images
    from dinoflow.data.manifest import read_manifest

    t0 = time.perf_counter()
    params = cd.params()
    table = read_manifest(store, spec.manifest_uri).slice(lo, hi - lo)
    pool, _ = load_images(store, table, channels=1, size_px=cd.px)
    pool = pool[:, 0].numpy()
    log.info(
        "copy detection: %d pool images decoded at %d px in %.1fs", len(pool), cd.px, time.perf_counter() - t0
    )
    touched = np.zeros(len(pool), bool)
    best_err = np.full(len(pool), np.inf, np.float32)
    best_row = np.full(len(pool), -1, np.int64)
    best_glob = np.full(len(pool), np.inf, np.float32)
    per_set = []
    offset = 0
    for mu, eu in zip(spec.eval_manifest_uris, spec.eval_embeddings_uris, strict=True):
        ev, _ = load_images(store, mu, channels=1, size_px=cd.px)
        m = detect_copies(pool, ev[:, 0].numpy(), params)
        # the row reported: a verified copy's match first, then the smallest robust error's
        better = (m.is_copy & ~touched) | ((m.is_copy | ~touched) & (m.error < best_err))
        best_err = np.minimum(m.error, best_err)
        best_glob = np.minimum(m.global_error, best_glob)
        best_row = np.where(better & (m.eval_row >= 0), m.eval_row + offset, best_row)
        touched |= m.is_copy
        offset += len(ev)
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
    return CopyRows(touched, best_row, best_err, best_glob), report


def _merge_copy_reports(reports: list[dict]) -> dict | None:
    """One copy-detection report for the whole pool from the parts' reports."""
    reports = [r for r in reports if r]
    if not reports:
        return None
    per_set = []
    for sets in zip(*(r["per_eval_set"] for r in reports), strict=True):
        merged = dict(sets[0])
        for key in ("candidates", "copies"):
            merged[key] = sum(s[key] for s in sets)
        merged["copies_per_alignment"] = {
            k: sum(s["copies_per_alignment"].get(k, 0) for s in sets) for k in sets[0]["copies_per_alignment"]
        }
        merged["seconds"] = {
            k: round(sum(s["seconds"].get(k, 0.0) for s in sets), 3) for k in sets[0]["seconds"]
        }
        per_set.append(merged)
    return {
        "copies": sum(r["copies"] for r in reports),
        "seconds": round(sum(r["seconds"] for r in reports), 3),
        "max_error": reports[0]["max_error"],
        "per_eval_set": per_set,
    }


def run_phase(spec: DedupSpec, store, phase: str, part: int = 0) -> dict:
    """One fan-out phase (``plan`` or ``part``), recorded under ``output_uri``."""
    return _fanout.run_phase("dedup", spec, store, phase, part, plan, search_part)


@dataclass
class EdgeGraph:
    """The k-NN graph's edges above a cosine floor: each pool row's ``k`` nearest others, merged over
    the parts (``q`` -> ``j`` with cosine ``s``), and how it was searched."""

    q: object  # int64 [e]
    j: object  # int64 [e]
    s: object  # float32 [e]
    kind: str
    reason: str
    nprobe: int = 0
    gpu: bool = False
    tuning: list = None  # type: ignore[assignment]
    nlist_sweep: list = None  # type: ignore[assignment]

    def above(self, threshold: float):
        """(query rows, neighbour rows, cosines) of the edges with cosine > ``threshold``."""
        m = self.s > threshold
        return self.q[m], self.j[m], self.s[m]


@dataclass
class SimilarityGraph:
    """What the thresholds act on (computed once; benches sweep thresholds over it)."""

    graph: EdgeGraph  # each pool row's k nearest other rows, edges above threshold_cos
    hash_edges: dict  # rule -> (a, b) for the exact and phash rules
    eval_top1: object  # float32 [n]: cosine of each pool row's nearest evaluation image (-1: none)
    touched_hash: object  # bool [n]: hash-equal to an evaluation image
    phash: object  # uint64 [n, 2] or None
    touched_copy: object = None  # bool [n]: verified copy of an evaluation image (copy_detection)
    copy_report: dict | None = None
    # the evaluation image each signal matched: a row of the evaluation sets concatenated in the
    # spec's order (-1: none); ``hash_rule``: "exact", "phash" or "" per pool row
    eval_top1_row: object = None  # int64 [n]
    hash_row: object = None  # int64 [n]
    hash_rule: object = None  # object [n]
    copy_row: object = None  # int64 [n]
    copy_error: object = None  # float32 [n]: best robust (geometric/occluder) error (inf: none)
    copy_global_error: object = None  # float32 [n]: best global-edit error (inf: none or off)
    # float32 [n, K]: each pool row's K nearest evaluation cosines, over every set (decontam_margin_rank
    # K - 1 > 0; None: only the nearest was kept)
    eval_topk: object = None


def similarity_graph(spec: DedupSpec, store, table, evals) -> SimilarityGraph:
    """Run (or reuse) the plan and every part, and merge them: the k-NN edges above
    ``threshold_cos``, hash edges, and each pool row's evaluation matches."""
    import numpy as np

    from dinoflow.curation.hashing import exact_match_rows, exact_pairs, hash_pairs
    from dinoflow.curation.partition import merge_edges
    from dinoflow.data.embeddings import get_npy, read_phash

    planned = run_phase(spec, store, "plan")
    parts = [run_phase(spec, store, "part", i) for i in range(spec.parts)]
    n = table.num_rows
    got: dict[str, list] = {"q": [], "j": [], "s": []}
    top1, top1_row, copies, copy_row, copy_err, copy_glob, topk = [], [], [], [], [], [], []

    def optional(uri, rows, fill, dtype):  # parts recorded before the file existed lack it
        return get_npy(store, uri) if store.exists(uri) else np.full(rows, fill, dtype)

    for i in range(spec.parts):
        where = spec.out("parts", f"part-{i:05d}")
        for name in got:
            got[name].append(get_npy(store, f"{where}/edges-{name}.npy"))
        top1.append(get_npy(store, f"{where}/eval_top1.npy"))
        rows = len(top1[-1])
        top1_row.append(optional(f"{where}/eval_top1_row.npy", rows, -1, np.int64))
        if spec.decontam_margin_rank:
            topk.append(get_npy(store, f"{where}/eval_topk.npy"))
        if parts[i].get("copy_detection"):
            copies.append(get_npy(store, f"{where}/copies.npy"))
            copy_row.append(optional(f"{where}/copy_row.npy", rows, -1, np.int64))
            copy_err.append(optional(f"{where}/copy_error.npy", rows, np.inf, np.float32))
            copy_glob.append(optional(f"{where}/copy_global_error.npy", rows, np.inf, np.float32))
    q, j, s = merge_edges(*(np.concatenate(got[k]) for k in ("q", "j", "s")), spec.k)
    graph = EdgeGraph(
        q,
        j,
        s,
        planned["kind"],
        planned["reason"],
        planned["nprobe"],
        any(p["gpu"] for p in parts),
        planned["tuning"],
        planned.get("nlist_sweep", []),
    )
    edges: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    sha = np.asarray(table.column("sha256").to_pylist(), dtype=object)
    if spec.exact_hash:
        edges["exact"] = exact_pairs(sha)
    ph = read_phash(store, spec.embeddings_uri)
    if spec.phash_max_bits >= 0 and ph is not None:
        a, b, _ = hash_pairs(ph, spec.phash_max_bits)
        edges["phash"] = (a, b)
    hash_row = np.full(n, -1, np.int64)
    hash_rule = np.full(n, "", dtype=object)
    offset = 0
    for et, eu in evals:  # the first evaluation image matched, exact before phash
        e_sha = np.asarray(et.column("sha256").to_pylist(), dtype=object)
        rows = exact_match_rows(sha, e_sha)
        rows[hash_row >= 0] = -1
        hash_row = np.where(rows >= 0, rows + offset, hash_row)
        hash_rule[rows >= 0] = "exact"
        e_ph = read_phash(store, eu) if spec.phash_decontaminates else None
        if spec.phash_max_bits >= 0 and ph is not None and e_ph is not None:
            pi, pj, _ = hash_pairs(ph, spec.phash_max_bits, other=e_ph)
            free = hash_row[pi] < 0
            pi, first = np.unique(pi[free], return_index=True)  # each pool row's first pair
            hash_row[pi] = pj[free][first] + offset
            hash_rule[pi] = "phash"
        offset += et.num_rows
    copy_report = _merge_copy_reports([p.get("copy_detection") for p in parts])
    return SimilarityGraph(
        graph,
        edges,
        np.concatenate(top1),
        hash_row >= 0,
        ph,
        np.concatenate(copies) if copies else None,
        copy_report,
        eval_top1_row=np.concatenate(top1_row),
        hash_row=hash_row,
        hash_rule=hash_rule,
        copy_row=np.concatenate(copy_row) if copies else None,
        copy_error=np.concatenate(copy_err) if copies else None,
        copy_global_error=np.concatenate(copy_glob) if copies else None,
        eval_topk=np.concatenate(topk) if topk else None,
    )


RULES = ("exact", "phash", "embedding", "contamination")
# why a row was dropped for contamination, first that applies: its own match of an evaluation image
# by content hash, perceptual hash, nearest-evaluation cosine or verified pixel copy, else "group"
# (a member of its duplicate group touched an evaluation set)
CONTAMINATION_RULES = ("exact", "phash", "cosine", "copy", "group")


def eval_scores(spec: DedupSpec, sim: SimilarityGraph):
    """float32 [n]: what ``decontam_threshold_cos`` is compared with: each pool row's nearest-evaluation
    cosine, less ``decontam_margin_weight`` x its (rank+1)-th nearest with a margin rank."""
    import numpy as np

    from dinoflow.curation.dedup import margin_scores

    r = spec.decontam_margin_rank
    if r == 0:
        return np.asarray(sim.eval_top1, np.float32)
    topk = None if sim.eval_topk is None else np.asarray(sim.eval_topk, np.float32)
    have = 0 if topk is None else topk.shape[1]
    if topk is None or have <= r:
        raise SpecError(
            f"decontam_margin_rank {r} needs each pool image's {r + 1} nearest evaluation cosines; the "
            f"similarity graph holds {max(have, 1)} (computed with a smaller decontam_margin_rank)"
        )
    return margin_scores(topk, r, spec.decontam_margin_weight)


def touch_rules(spec: DedupSpec, sim: SimilarityGraph):
    """object [n]: the rule by which each pool row itself touches an evaluation set ("" none)."""
    import numpy as np

    n = len(sim.eval_top1)
    rule = np.full(n, "", dtype=object)
    copy = sim.touched_copy if sim.touched_copy is not None else np.zeros(n, bool)
    hash_rule = sim.hash_rule if sim.hash_rule is not None else np.where(sim.touched_hash, "exact", "")
    for name, hit in (
        ("copy", copy),
        ("cosine", (sim.eval_top1 > -1) & (eval_scores(spec, sim) > spec.decontam_threshold_cos)),
        ("phash", sim.touched_hash & (hash_rule == "phash")),
        ("exact", sim.touched_hash & (hash_rule != "phash")),
    ):  # the strongest written last
        rule[hit] = name
    return rule


def decide(spec: DedupSpec, table, sim: SimilarityGraph):
    """Apply the thresholds to the similarity graph: a ``dinoflow.curation.dedup`` outcome (which rows
    stay, each row's group and reason). Refuses to remove more than ``max_removed_fraction``."""
    import numpy as np

    from dinoflow.curation.dedup import dedup

    n = table.num_rows
    edges = dict(sim.hash_edges)
    q, nb, _ = sim.graph.above(spec.threshold_cos)
    edges["embedding"] = (q, nb)
    # decontamination: a pool image touches an eval set by hash, by its nearest eval cosine, or as a copy
    touched = touch_rules(spec, sim) != ""
    area = np.asarray(table.column("width").to_numpy(zero_copy_only=False), np.int64) * np.asarray(
        table.column("height").to_numpy(zero_copy_only=False), np.int64
    )
    out = dedup(
        n,
        edges,
        area=area,
        touched_eval=np.flatnonzero(touched),
        grouping=spec.grouping,
        spread=spec.contamination_spread,
    )
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


def _write_kept(spec: DedupSpec, store, table, meta, phash, out) -> tuple[str, str]:
    """The kept manifest (same shards) and the kept rows' embeddings; returns both URIs."""
    import numpy as np
    import pyarrow as pa

    from dinoflow.data.embeddings import EmbeddingReader, copy_rows
    from dinoflow.data.manifest import write_manifest

    keep_rows = np.flatnonzero(out.keep)
    manifest_uri = spec.out("manifest.parquet")
    write_manifest(store, manifest_uri, table.take(pa.array(keep_rows)))
    emb_out = spec.out("embeddings")
    copy_rows(
        store,
        EmbeddingReader(store, spec.embeddings_uri, meta),
        keep_rows,
        emb_out,
        phash=None if phash is None else phash[keep_rows],
        meta={
            "manifest_uri": manifest_uri,
            "backbone_uri": meta.get("backbone_uri"),
            "features": meta.get("features"),
            "parent": spec.embeddings_uri,
        },
    )
    return manifest_uri, emb_out


def contamination_evidence(spec: DedupSpec, out, sim: SimilarityGraph) -> dict:
    """Per pool row, why it was dropped for contamination and against what (row-aligned arrays):
    ``rule`` (a ``CONTAMINATION_RULES`` name, "" when not dropped for contamination), ``toucher``
    (the row whose own match dropped it: itself, or for "group" the first touching row of its
    group), ``eval_row`` (the evaluation image the toucher's rule matched, a row of the evaluation
    sets concatenated; -1 none)."""
    import numpy as np

    n = len(out.labels)
    own = touch_rules(spec, sim)
    dropped = out.reason == "contamination"
    first_toucher = np.full(out.n_components, -1, np.int64)
    t = np.flatnonzero(own != "")
    lab, first = np.unique(out.labels[t], return_index=True)
    first_toucher[lab] = t[first]  # each group's earliest touching row
    toucher = np.where(own != "", np.arange(n), first_toucher[out.labels])
    toucher = np.where(dropped, toucher, -1)
    rule = np.where(dropped, np.where(own != "", own, "group"), "").astype(object)

    def rows_of(a):
        return np.full(n, -1, np.int64) if a is None else np.asarray(a, np.int64)

    match = {"exact": rows_of(sim.hash_row), "phash": rows_of(sim.hash_row)}
    match |= {"cosine": rows_of(sim.eval_top1_row), "copy": rows_of(sim.copy_row)}
    eval_row = np.full(n, -1, np.int64)
    has = toucher >= 0
    for name, rows in match.items():
        m = has & (own[np.maximum(toucher, 0)] == name)
        eval_row[m] = rows[toucher[m]]
    return {"rule": rule, "toucher": toucher, "eval_row": eval_row}


def _write_groups(spec: DedupSpec, store, table, out, sim: SimilarityGraph, evals) -> str:
    """Every row in a multi-image group or dropped for contamination, with its representative; a
    contamination row also with its rule, the evaluation image matched and the similarities, so a
    person can look at each pair (``contamination_evidence``)."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = np.asarray(table.column("key").to_pylist(), dtype=object)
    listed = np.flatnonzero((np.bincount(out.labels)[out.labels] > 1) | (out.reason == "contamination"))
    ev = contamination_evidence(spec, out, sim)
    eval_keys = np.asarray(
        [k for et, _ in evals for k in et.column("key").to_pylist()] + [""], dtype=object
    )  # row -1 reads the trailing ""
    eval_sets = np.asarray(
        [mu for (et, _), mu in zip(evals, spec.eval_manifest_uris, strict=True) for _ in range(et.num_rows)]
        + [""],
        dtype=object,
    )
    er, toucher = ev["eval_row"][listed], ev["toucher"][listed]

    def errors(a):
        return np.asarray(a[listed] if a is not None else np.full(len(listed), np.inf), np.float32)

    groups = pa.table(
        {
            "key": keys[listed].tolist(),
            "group": out.labels[listed],
            "representative": [keys[r] if r >= 0 else "" for r in out.representative[listed]],
            "reason": out.reason[listed].tolist(),
            "contamination_rule": ev["rule"][listed].tolist(),
            "touched_by": [keys[t] if t >= 0 else "" for t in toucher],
            "eval_manifest": eval_sets[er].tolist(),
            "eval_key": eval_keys[er].tolist(),
            # the row's own nearest-evaluation cosine, and its best copy-detection errors (inf: none):
            # robust (geometric/occluder, a copy at <= max_error) and global edit (<= global_max_error)
            "eval_cos": np.asarray(sim.eval_top1[listed], np.float32),
            # what decontam_threshold_cos was compared with (eval_cos itself without a margin rank)
            "eval_score": eval_scores(spec, sim)[listed],
            "copy_error": errors(sim.copy_error),
            "copy_global_error": errors(sim.copy_global_error),
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
        "contamination_per_rule": {
            r: int((contamination_evidence(spec, out, sim)["rule"] == r).sum()) for r in CONTAMINATION_RULES
        },
        "edges_per_rule": out.edges_per_rule,
        "per_source": per_source,
        "index": {
            "kind": g.kind,
            "reason": g.reason,
            "gpu": g.gpu,
            "nprobe": g.nprobe,
            "nprobe_sweep": g.tuning,
            "nlist_sweep": g.nlist_sweep or [],
            "parts": spec.parts,
        },
        "keep_rule": "largest pixel area, then earliest manifest row",
        "grouping": spec.grouping,
        "decontamination_rule": "pool images whose nearest evaluation image is above "
        "decontam_threshold_cos (or hash-equal, or a verified pixel copy), with their whole duplicate group"
        + (
            f"; the cosine less {spec.decontam_margin_weight} x that of the image's "
            f"{spec.decontam_margin_rank + 1}-th nearest evaluation image"
            if spec.decontam_margin_rank
            else ""
        ),
        "copy_detection": sim.copy_report,
        "compared": spec.vectors()[0],
        "thresholds": {
            "threshold_cos": spec.threshold_cos,
            "decontam_threshold_cos": spec.decontam_threshold_cos,
            "decontam_margin_rank": spec.decontam_margin_rank,
            "decontam_margin_weight": spec.decontam_margin_weight,
            "k": spec.k,
            "phash_max_bits": spec.phash_max_bits,
            "center": spec.center,
        },
    }


def run(spec: DedupSpec, store) -> DedupResult:
    from dinoflow.metrics import IMAGES_PROCESSED

    table, meta, evals = load_inputs(spec, store)  # everything validated before any heavy work
    n = table.num_rows
    sim = similarity_graph(spec, store, table, evals)
    try:
        out = decide(spec, table, sim)
    except SpecError:
        _fanout.discard(store, spec)  # a refused run leaves nothing behind
        raise
    manifest_uri, emb_out = _write_kept(spec, store, table, meta, sim.phash, out)
    groups_uri = _write_groups(spec, store, table, out, sim, evals)
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
        index_kind=sim.graph.kind,
        index_reason=sim.graph.reason,
        nprobe=sim.graph.nprobe,
        parts=spec.parts,
    )
