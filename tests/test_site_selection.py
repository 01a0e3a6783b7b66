"""A site's running best model on hand-made weights and scores; in whole federations: test_rounds."""

from __future__ import annotations

import torch

from fedpsmos.federated.site_selection import best_from_private, best_into_private, updated_best


def _weights(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2,), value)}


def test_updated_best_keeps_the_strictly_better_global_then_local_model():
    # Prepare: round 1 scores its incoming global 0.4 and its local model 0.6
    scored = {"global": ({"liver": 0.4}, 0.4), "local": ({"liver": 0.6}, 0.6)}
    # Execute
    best = updated_best(None, 1, scored, _weights(0.0), _weights(1.0))
    # Assert: the local model of round 1, a copy of its weights
    assert best is not None and {k: best[k] for k in ("round", "which", "score")} == {
        "round": 1,
        "which": "local",
        "score": 0.6,
    }
    assert torch.equal(best["model"]["w"], torch.ones(2))
    # round 2: the incoming global (round 1's global.pt) ties at 0.6 and loses, as does the local 0.5
    kept = updated_best(best, 2, {"global": ({}, 0.6), "local": ({}, 0.5)}, _weights(2.0), _weights(3.0))
    assert kept is not None and (kept["round"], kept["which"]) == (1, "local")
    # round 3: the incoming global (round 2's global.pt) beats it; a better local model then beats that
    received = updated_best(best, 3, {"global": ({}, 0.7), "local": ({}, 0.1)}, _weights(4.0), _weights(5.0))
    trained = updated_best(best, 3, {"global": ({}, 0.7), "local": ({}, 0.8)}, _weights(4.0), _weights(5.0))
    assert received is not None and (received["round"], received["which"], received["score"]) == (
        2,
        "global",
        0.7,
    )
    assert torch.equal(received["model"]["w"], _weights(4.0)["w"])
    assert trained is not None and (trained["round"], trained["which"], trained["score"]) == (3, "local", 0.8)
    assert best["score"] == 0.6  # the previous best is not changed in place


def test_updated_best_without_scores_keeps_what_there_is():
    unscored = {"global": ({}, None), "local": ({}, None)}
    assert updated_best(None, 1, unscored, _weights(0.0), _weights(1.0)) is None


def test_best_round_trips_through_the_private_state():
    # Prepare
    best = {"round": 2, "which": "global", "score": 0.7, "model": _weights(2.0)}
    private = {"model": {}, "trainer": {}, "meta": {"site": "site1", "round": 3, "failed": False}}
    # Execute
    written = best_into_private(private, best)
    read = best_from_private(written)
    # Assert: fields in the meta, weights beside them; nothing added without a best
    assert written["meta"]["best"] == {"round": 2, "which": "global", "score": 0.7}
    assert read is not None and read["round"] == 2 and torch.equal(read["model"]["w"], _weights(2.0)["w"])
    bare = best_into_private({"model": {}, "trainer": {}, "meta": {}}, None)
    assert "best_model" not in bare and best_from_private(bare) is None
