"""Weighted cosine k-NN: hand-computed answers on a tiny feature set."""

from __future__ import annotations

import math

import pytest
import torch

from dinoflow.errors import SpecError
from dinoflow.eval.knn import knn_classify

# Four training points on the unit circle (two classes) and one query along +x.
TRAIN = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
LABELS = torch.tensor([0, 1, 1, 0])
QUERY = torch.tensor([[3.0, 0.0]])  # length 3: cosine ignores scale


def test_neighbours_and_similarities_are_cosine_sorted():
    r = knn_classify(TRAIN * 5, LABELS, QUERY, ks=[4])
    assert r.neighbours.tolist() == [[0, 1, 2, 3]]
    assert torch.allclose(r.similarities, torch.tensor([[1.0, 0.8, 0.0, -1.0]]))


def test_temperature_decides_a_close_vote():
    # k=3: class 0 gets exp(1/T); class 1 gets exp(0.8/T) + exp(0/T).
    # T=1:    e^1 = 2.718 < e^0.8 + 1 = 3.226  -> class 1
    # T=0.07: e^14.3 >> e^11.4 + 1             -> class 0
    assert math.exp(1) < math.exp(0.8) + 1
    hot = knn_classify(TRAIN, LABELS, QUERY, torch.tensor([1]), ks=[1, 2, 3], temperature=1.0)
    cold = knn_classify(TRAIN, LABELS, QUERY, torch.tensor([1]), ks=[1, 2, 3], temperature=0.07)
    assert [hot.predictions[k].item() for k in (1, 2, 3)] == [0, 0, 1]
    assert [cold.predictions[k].item() for k in (1, 2, 3)] == [0, 0, 0]
    assert hot.top1 == {1: 0.0, 2: 0.0, 3: 1.0}


def test_accuracy_over_several_queries_and_chunks():
    queries = torch.tensor([[1.0, 0.05], [0.1, 1.0], [-1.0, -0.1], [0.7, 0.7]])
    truth = torch.tensor([0, 1, 0, 0])  # the last query's nearest neighbour is class 1: a miss at k=1
    r = knn_classify(TRAIN, LABELS, queries, truth, ks=[1], chunk_size=3)
    assert r.predictions[1].tolist() == [0, 1, 0, 1]
    assert r.top1[1] == pytest.approx(0.75)


def test_bad_inputs_fail_with_a_clear_message():
    with pytest.raises(SpecError, match="exceeds the 4 training samples"):
        knn_classify(TRAIN, LABELS, QUERY, ks=[10])
    with pytest.raises(SpecError, match="2 dims but test features 3"):
        knn_classify(TRAIN, LABELS, torch.ones(1, 3), ks=[1])
    with pytest.raises(SpecError, match="unlabelled"):
        knn_classify(TRAIN, torch.tensor([0, 1, -1, 0]), QUERY, ks=[1])
