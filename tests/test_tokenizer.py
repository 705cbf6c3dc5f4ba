"""k-means patch tokenizer: deterministic for a seed, exact round trip, storage round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinoflow.data.idx import load_fashion_mnist
from dinoflow.errors import SpecError
from dinoflow.models.tokenizer import KMeansPatchTokenizer

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    x, _ = load_fashion_mnist("train")
    return torch.from_numpy(np.array(x[:300])).unsqueeze(1)  # uint8 [300, 1, 28, 28]


def _fit(images: torch.Tensor, seed: int) -> KMeansPatchTokenizer:
    return KMeansPatchTokenizer(n_codes=32, patch_px=4, in_chans=1).fit(images, seed=seed, iters=10)


def test_deterministic_for_a_seed(images):
    a, b, c = _fit(images, 0), _fit(images, 0), _fit(images, 1)
    assert torch.equal(a.centroids, b.centroids)
    assert torch.equal(a.encode(images[:20]), b.encode(images[:20]))
    assert not torch.equal(a.centroids, c.centroids)


def test_codes_round_trip_and_are_informative(images):
    tok = _fit(images, 0)
    codes = tok.encode(images[:50])
    assert codes.shape == (50, 49) and codes.dtype == torch.long
    recon = tok.decode(codes, (7, 7))
    assert recon.shape == (50, 1, 28, 28)
    assert torch.equal(tok.encode(recon), codes)
    # The codebook is used and the decoded images are closer to their inputs than the mean image.
    assert codes.unique().numel() >= 16
    err = (recon - images[:50].float()).pow(2).mean()
    base = (images[:50].float() - images[:50].float().mean()).pow(2).mean()
    assert err < 0.5 * base


def test_save_load_and_errors(store, bucket_uri, images):
    tok = _fit(images, 0)
    tok.save(store, bucket_uri + "/tok")
    back = KMeansPatchTokenizer.load(store, bucket_uri + "/tok")
    assert torch.equal(back.encode(images[:10]), tok.encode(images[:10]))
    with pytest.raises(SpecError, match="not fitted"):
        KMeansPatchTokenizer(8, 4, 1).encode(images[:2])
    with pytest.raises(SpecError, match="wants images"):
        tok.encode(images[:2, :, :, :].repeat(1, 3, 1, 1))
    with pytest.raises(SpecError, match="cannot seed"):
        KMeansPatchTokenizer(1000, 4, 1).fit(images[:2])
