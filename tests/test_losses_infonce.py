"""InfoNCE: a hand-computed case, and the same loss and gradients across 2 gloo processes."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from dinoflow.losses.infonce import info_nce

torch.set_num_threads(1)


def test_hand_computed_case():
    # Unit vectors: a0 = b0 = e1, a1 = e2, b1 = (e1 + e2)/sqrt2. T = 0.5.
    s = 1 / math.sqrt(2)
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [s, s]])
    t = 0.5
    # cos(a_i, b_j): [[1, s], [0, s]]; cross-entropy of each row with the diagonal as the label.
    ab = [-(1 / t) + math.log(math.exp(1 / t) + math.exp(s / t)), -(s / t) + math.log(1 + math.exp(s / t))]
    # cos(b_i, a_j) = transpose: [[1, 0], [s, s]]
    ba = [-(1 / t) + math.log(math.exp(1 / t) + 1), -(s / t) + math.log(2 * math.exp(s / t))]
    want = 0.5 * (sum(ab) / 2 + sum(ba) / 2)
    assert info_nce(a, b, temperature=t).item() == pytest.approx(want, rel=1e-6)
    # Scale-invariant (cosine similarity) and symmetric in its two arguments.
    assert info_nce(3 * a, 0.5 * b, temperature=t).item() == pytest.approx(want, rel=1e-6)
    assert info_nce(b, a, temperature=t).item() == pytest.approx(want, rel=1e-6)


def test_bad_input():
    with pytest.raises(ValueError, match="one shape"):
        info_nce(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="temperature"):
        info_nce(torch.ones(2, 3), torch.ones(2, 3), temperature=0)


def _worker(rank: int, world: int, init_file: str, a: torch.Tensor, b: torch.Tensor, out: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        n = a.shape[0] // world
        la = a[rank * n : (rank + 1) * n].clone().requires_grad_(True)
        lb = b[rank * n : (rank + 1) * n].clone().requires_grad_(True)
        loss = info_nce(la, lb, temperature=0.1)
        loss.backward()
        # What DDP would do: average the loss and the gradients over ranks.
        g = torch.cat([la.grad, lb.grad], dim=1)
        parts = [torch.zeros_like(g) for _ in range(world)]
        dist.all_gather(parts, g)
        lt = loss.detach().clone()
        dist.all_reduce(lt)
        if rank == 0:
            out["loss"] = (lt / world).item()
            out["grad"] = torch.cat(parts, dim=0) / world
        dist.barrier()  # no rank tears gloo down while the other is still in a collective (SIGABRT)
    finally:
        dist.destroy_process_group()
    # Reached only when the work above succeeded (an exception still fails the spawn). Leave without
    # C++ static teardown: gloo's threads have aborted a rank at interpreter exit ("terminate called
    # without an active exception", SIGABRT) after every result was already in ``out``.
    os._exit(0)


def test_two_gloo_processes_match_one_global_batch(tmp_path):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    b = a + 0.5 * b  # positives are related, so the loss is far from chance
    ra, rb = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    ref = info_nce(ra, rb, temperature=0.1)
    ref.backward()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = mp.Manager().dict()
    mp.start_processes(
        _worker, args=(2, str(tmp_path / "pg"), a, b, out), nprocs=2, join=True, start_method="spawn"
    )
    assert out["loss"] == pytest.approx(ref.item(), rel=1e-5)
    # Each rank's loss covers its own queries; the all-gather backward routes every key's gradient
    # home, so the rank-averaged gradient is the single-process gradient of the global loss.
    want = torch.cat([ra.grad, rb.grad], dim=1)
    torch.testing.assert_close(out["grad"], want, rtol=1e-4, atol=1e-6)
    # Negatives really come from the other rank: a local-only loss differs.
    local = 0.5 * (info_nce(a[:4], b[:4], temperature=0.1) + info_nce(a[4:], b[4:], temperature=0.1))
    assert abs(local.item() - ref.item()) > 1e-3
