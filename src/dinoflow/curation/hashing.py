"""Duplicates by content hash: exact (equal digests of the stored bytes) and near-exact by a 64-bit
perceptual hash (pHash: signs of low DCT frequencies).

An image is reduced to 32x32 grayscale; the 8x8 lowest 2-D DCT frequencies are compared with
their median (DC excluded from the median) to give 64 bits. JPEG re-encoding, mild blur and
brightness shifts change few bits; a horizontal flip flips the sign of every odd horizontal
frequency, so each image also carries the hash of its mirror image and flips match too.

Pairs within ``max_bits`` Hamming distance are found without comparing all pairs: split the 64
bits into ``max_bits + 1`` bands; two hashes that differ in at most ``max_bits`` bits agree exactly
on at least one band (pigeonhole), so only rows sharing a band value are compared.
"""

from __future__ import annotations

import numpy as np

HASH_PX = 32  # pHash convention: DCT of a 32x32 reduction, keep the 8x8 low frequencies
_BITS = 1 << np.arange(64, dtype=np.uint64)


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_D = _dct_matrix(HASH_PX)[:8]  # [8, 32]: only the low frequencies are needed


def _pack(bits: np.ndarray) -> np.ndarray:
    return (bits.reshape(len(bits), 64).astype(np.uint64) * _BITS).sum(axis=1, dtype=np.uint64)


def phash64(gray: np.ndarray) -> np.ndarray:
    """uint64 [N, 2]: the pHash of each image and of its horizontal mirror. ``gray``: [N, 32, 32]."""
    g = np.asarray(gray, dtype=np.float32)
    if g.ndim != 3 or g.shape[1:] != (HASH_PX, HASH_PX):
        raise ValueError(f"phash64 expects [N, {HASH_PX}, {HASH_PX}] grayscale, got {g.shape}")
    # two matrix products: einsum with optimize=True spent ~2.5 ms per call choosing its path, 100x
    # the DCT itself, and the embed stage hashes one image per call in its DataLoader workers
    low = _D @ g @ _D.T  # [N, 8, 8], float64
    sign = np.where(np.arange(8) % 2 == 1, -1.0, 1.0).astype(np.float32)  # mirror: odd horizontal freqs flip
    out = np.empty((len(g), 2), np.uint64)
    for col, coef in enumerate((low, low * sign[None, None, :])):
        flat = coef.reshape(len(g), 64)
        med = np.partition(flat[:, 1:], 31, axis=1)[:, 31:32]  # the median of 63 (np.median: 4x slower)
        out[:, col] = _pack(flat > med)
    return out


def reduce_for_hash(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W] or [N, C, H, W] -> float32 [N, 32, 32] grayscale (area/bilinear resize)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(images).copy()).float()
    if x.ndim == 3:
        x = x[:, None]
    if x.shape[1] == 3:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif x.shape[1] != 1:
        x = x.mean(1, keepdim=True)
    x = F.interpolate(x, size=(HASH_PX, HASH_PX), mode="bilinear", align_corners=False, antialias=True)
    return x[:, 0].numpy()


def phash_pil(img) -> np.ndarray:
    """uint64 [2] for one PIL image (used inside DataLoader workers)."""
    from PIL import Image

    g = np.asarray(img.convert("L").resize((HASH_PX, HASH_PX), Image.BILINEAR), dtype=np.float32)
    return phash64(g[None])[0]


def exact_pairs(digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges (head, member) joining every row to the first row with the same digest: a star per
    hash group, so no member is missed and nothing chains."""
    d = np.asarray(digests).astype(str)
    if len(d) == 0:
        z = np.zeros(0, np.int64)
        return z, z
    _, first, inv = np.unique(d, return_index=True, return_inverse=True)
    head = first[inv.ravel()]
    dup = np.flatnonzero(head != np.arange(len(d)))
    return head[dup].astype(np.int64), dup.astype(np.int64)


def exact_matches(digests: np.ndarray, other: np.ndarray) -> np.ndarray:
    """bool [N]: rows of ``digests`` whose digest also occurs in ``other``."""
    return np.isin(np.asarray(digests).astype(str), np.asarray(other).astype(str))


def exact_match_rows(digests: np.ndarray, other: np.ndarray) -> np.ndarray:
    """int64 [N]: for each row of ``digests``, the first row of ``other`` with the same digest (-1: none)."""
    d, o = np.asarray(digests).astype(str), np.asarray(other).astype(str)
    values, first = np.unique(o, return_index=True)  # values sorted, first: their earliest row
    at = np.minimum(np.searchsorted(values, d), max(len(values) - 1, 0))
    hit = (values[at] == d) if len(values) else np.zeros(len(d), bool)
    return np.where(hit, first[at] if len(values) else -1, -1).astype(np.int64)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int64)


def hash_pairs(
    hashes: np.ndarray, max_bits: int, *, other: np.ndarray | None = None, max_group: int = 4096
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i, j, bits) with Hamming distance <= ``max_bits``.

    ``hashes``: uint64 [N, 2] (hash, mirror hash). Without ``other``: pairs within ``hashes``
    (i < j), comparing each row's hash with the other's hash and its mirror. With ``other``
    ([M, 2]): pairs (i in hashes, j in other). A band value shared by more than ``max_group``
    rows (e.g. blank images) is compared in blocks, never skipped.
    """
    h = np.asarray(hashes, dtype=np.uint64)
    if h.ndim != 2 or h.shape[1] != 2:
        raise ValueError(f"hash_pairs expects uint64 [N, 2], got {h.shape}")
    if not 0 <= max_bits < 64:
        raise ValueError(f"max_bits must be in [0, 63], got {max_bits}")
    cross = other is not None
    o = np.asarray(other if cross else h, dtype=np.uint64)
    nb = max_bits + 1
    edges = np.linspace(0, 64, nb + 1).astype(int)
    out_i, out_j = [], []
    # a row's hash vs the other row's hash, and vs the other's mirror hash
    for col in (0, 1):
        left = h[:, 0]
        right = o[:, col]
        for b in range(nb):
            lo, hi = edges[b], edges[b + 1]
            mask = np.uint64(((1 << (hi - lo)) - 1) << lo)
            kl = left & mask
            kr = right & mask
            keys = np.concatenate([kl, kr])
            side = np.concatenate([np.zeros(len(kl), np.int8), np.ones(len(kr), np.int8)])
            idx = np.concatenate([np.arange(len(kl)), np.arange(len(kr))])
            order = np.lexsort((side, keys))
            keys, side, idx = keys[order], side[order], idx[order]
            starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
            ends = np.r_[starts[1:], len(keys)]
            multi = np.flatnonzero((ends - starts) > 1)
            for g in multi:
                s, e = starts[g], ends[g]
                li = idx[s:e][side[s:e] == 0]
                ri = idx[s:e][side[s:e] == 1]
                if len(li) == 0 or len(ri) == 0:
                    continue
                for c in range(0, len(li), max_group):
                    blk = li[c : c + max_group]
                    d = hamming(h[blk, 0][:, None], o[ri, col][None, :])
                    ii, jj = np.nonzero(d <= max_bits)
                    out_i.append(blk[ii])
                    out_j.append(ri[jj])
    if not out_i:
        z = np.zeros(0, np.int64)
        return z, z, z
    i = np.concatenate(out_i).astype(np.int64)
    j = np.concatenate(out_j).astype(np.int64)
    if not cross:
        keep = i != j
        i, j = i[keep], j[keep]
        i, j = np.minimum(i, j), np.maximum(i, j)
    pair = np.unique(np.stack([i, j], 1), axis=0)
    i, j = pair[:, 0], pair[:, 1]
    bits = np.minimum(hamming(h[i, 0], o[j, 0]), hamming(h[i, 0], o[j, 1]))
    if not cross:  # the mirror hash re-thresholds, so mirror matching is not symmetric
        bits = np.minimum(bits, hamming(h[j, 0], o[i, 1]))
    return i, j, bits
