"""--detector auto's candidates and pick (anomaly_core.training.auto)."""

import pytest

from anomaly_core.training.auto import Candidate, objective, parse_candidates, pick


def test_candidates_parse_with_their_settings_and_bad_ones_are_named():
    found = parse_candidates("padim; patchcore:coreset_ratio=0.01,num_neighbors=3")
    assert found == [Candidate("padim"), Candidate(
        "patchcore", (("coreset_ratio", 0.01), ("num_neighbors", 3)))]
    assert found[1].label == "patchcore-coreset_ratio-0.01-num_neighbors-3"
    with pytest.raises(ValueError, match="unknown detector 'nope'"):
        parse_candidates("padim;nope")
    with pytest.raises(ValueError, match="padim has no option"):
        parse_candidates("padim:flow_steps=4")
    with pytest.raises(ValueError, match="at least one"):
        parse_candidates(" ; ")


def test_the_best_objective_wins_the_first_listed_on_a_tie_and_none_is_skipped():
    a, b, c = Candidate("padim"), Candidate("patchcore"), Candidate("stpm")
    assert pick([(a, 0.7), (b, 0.9), (c, None)]) == b
    assert pick([(a, 0.9), (b, 0.9)]) == a
    with pytest.raises(ValueError, match="no --detector auto candidate"):
        pick([(a, None)])
    assert objective({"objective": 0.8, "val_image_auroc": 0.6}) == 0.8
    assert objective({"val_image_auroc": 0.6}) == 0.6 and objective({}) is None
