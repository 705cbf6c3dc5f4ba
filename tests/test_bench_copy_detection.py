"""``dinoflow bench copy-detection`` end to end at tiny sizes (slow: ~70 s on 2 cores): the
descriptor trains, every embedder is thresholded on the validation pool (decontamination rule
included) and scored on the test pool, and the JSON line holds what the issue asks for."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_copy_detection_bench_chooses_its_decontamination_rule_on_validation(capsys, s3_env):
    from dinoflow_tools.bench import copy_detection

    tiny = "--pool-size 600 --val-pool-size 400 --eval-size 400 --dup-per-family 4 --contam-per-family 4"
    tiny += " --val-dup-per-family 4 --val-contam-per-family 4 --fmnist-train 2000 --steps 20"
    tiny += " --batch-size 32 --bootstrap-steps 10 --bootstrap-sample 500 --embedders learned,pixel"
    copy_detection.main(tiny.split())
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in (
        "heldout_contamination_recall",
        "heldout_contamination_precision",
        "heldout_dup_recall",
        "heldout_dup_precision",
        "seen_dup_recall",
        "seen_dup_precision",
        "fmnist_train_flagged_fraction",
        "seconds_per_1k_images",
    ):
        assert 0 <= row[key] and (key == "seconds_per_1k_images" or row[key] <= 1), key
    for thr in (row["thresholds"], row["baselines"]["pixel"]["thresholds"]):
        sweep = thr["margin_sweep"]
        assert [(s["decontam_margin_rank"], s["decontam_margin_weight"]) for s in sweep] == list(
            copy_detection.MARGINS
        )
        chosen = [s for s in sweep if s["decontam_margin_rank"] == thr["decontam_margin_rank"]]
        chosen = [s for s in chosen if s["decontam_margin_weight"] == thr["decontam_margin_weight"]]
        assert chosen[0]["decontam_threshold_cos"] == thr["decontam_threshold_cos"]
        best = max(
            s["val_contamination_recall"] for s in sweep if s["contam_target_met"] == thr["contam_target_met"]
        )
        assert thr["val_contamination_recall"] == best
    assert set(row["per_family"]["learned"]) >= {"perspective", "crop", "compose_heldout"}
    plain = row["learned"]["plain_rule"]  # the plain cosine rule beside the chosen one
    assert plain["decontam_threshold_cos"] == row["thresholds"]["margin_sweep"][0]["decontam_threshold_cos"]
    assert (
        0 <= plain["heldout_contamination_recall"] <= 1 and 0 <= plain["fmnist_train_flagged_fraction"] <= 1
    )
