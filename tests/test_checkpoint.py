"""Checkpoints: round trip, and every refusal (missing, truncated, tampered, NaN, code-running pickle)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedpsmos.network import NetworkSpec, build_network
from fedpsmos.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model_state,
    numpy_generator_state,
    save_checkpoint,
    set_numpy_generator_state,
)
from tests.conftest import tiny_spec


def tiny_payload() -> dict:
    return {
        "model": {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(2)},
        "meta": {"kind": "pretrain", "organs": ["liver"], "round": 0, "ratio": 0.5, "note": None},
        "history": [{"epoch": 1, "loss": 0.7}],
        "optimizer": {"state": {0: {"momentum_buffer": torch.ones(3)}}, "param_groups": [{"lr": 0.01}]},
    }


class RunsCode:
    """A pickle payload that would create a file when unpickled by a full unpickler."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_round_trip_keeps_tensors_metadata_and_records_integrity(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "sub" / "model.pt"
    payload = tiny_payload()
    # Execute
    save_checkpoint(path, payload)
    loaded = load_checkpoint(path)
    # Assert
    assert torch.equal(loaded["model"]["w"], payload["model"]["w"])
    assert loaded["meta"] == payload["meta"] and loaded["history"] == payload["history"]
    assert torch.equal(loaded["optimizer"]["state"][0]["momentum_buffer"], torch.ones(3))
    record = loaded["integrity"]
    assert record["/model/w"]["bytes"] == 24 and len(record["/model/w"]["sha256"]) == 64
    assert set(record) == {"/model/w", "/model/b", "/optimizer/state/0/momentum_buffer"}
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temporary left behind


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nope\.pt: checkpoint file does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "model.pt"
    save_checkpoint(path, tiny_payload())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    # Execute / Assert
    with pytest.raises(CheckpointError, match=r"model\.pt: truncated or corrupt"):
        load_checkpoint(path)


def test_tampered_tensor_is_refused(tmp_path: Path) -> None:
    # Prepare: change a weight but keep the recorded integrity, as a tampering site would
    path = tmp_path / "model.pt"
    save_checkpoint(path, tiny_payload())
    raw = torch.load(path, weights_only=True)
    raw["model"]["w"][0, 0] = 100.0
    torch.save(raw, path)
    # Execute / Assert
    with pytest.raises(CheckpointError, match=r"model\.pt: integrity mismatch for tensor /model/w"):
        load_checkpoint(path)


def test_added_tensor_is_refused(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "model.pt"
    save_checkpoint(path, tiny_payload())
    raw = torch.load(path, weights_only=True)
    raw["model"]["extra"] = torch.ones(1)
    torch.save(raw, path)
    # Execute / Assert
    with pytest.raises(CheckpointError, match="tensors added or removed"):
        load_checkpoint(path)


def test_non_finite_model_values_are_refused(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "model.pt"
    payload = tiny_payload()
    payload["model"]["w"][1, 2] = float("nan")
    save_checkpoint(path, payload)
    # Execute / Assert
    with pytest.raises(CheckpointError, match=r"model\.pt: model tensor w holds non-finite values"):
        load_checkpoint(path)


def test_code_running_pickle_is_refused_before_it_runs(tmp_path: Path) -> None:
    # Prepare
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "meta": RunsCode(marker)}, path)
    # Execute
    with pytest.raises(CheckpointError, match=r"evil\.pt: not a weights-only checkpoint"):
        load_checkpoint(path)
    # Assert: nothing ran, though a full unpickler does run the payload (so the refusal is what stopped it)
    assert not marker.exists()
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_objects_that_are_not_plain_metadata_are_not_saved(tmp_path: Path) -> None:
    # Prepare
    payload = tiny_payload()
    payload["meta"]["array"] = np.zeros(3)
    # Execute / Assert
    with pytest.raises(CheckpointError, match=r"model\.pt: cannot save /meta/array: ndarray"):
        save_checkpoint(tmp_path / "model.pt", payload)
    assert not (tmp_path / "model.pt").exists()


def test_wrong_shape_state_gives_a_clear_error() -> None:
    # Prepare
    spec = tiny_spec(6)
    six = build_network(spec, seed=0)
    two = build_network(NetworkSpec.from_dict({**spec.to_dict(), "num_classes": 2}), seed=0)
    # Execute / Assert
    with pytest.raises(
        CheckpointError, match=r"m0\.pt: tensor decoder\.seg_layers\.0\.weight has shape \[6, 4"
    ):
        load_model_state(two, six.state_dict(), source="m0.pt")
    with pytest.raises(CheckpointError, match="state dict does not match the network"):
        load_model_state(two, {"x": torch.zeros(1)}, source="m0.pt")


def test_generator_states_survive_a_weights_only_round_trip(tmp_path: Path) -> None:
    # Prepare
    np_rng = np.random.default_rng(3)
    np_rng.random(5)
    path = tmp_path / "rng.pt"
    # Execute
    save_checkpoint(path, {"model": {}, "meta": {}, "rng": {"numpy": numpy_generator_state(np_rng)}})
    loaded = load_checkpoint(path)["rng"]
    np_new = np.random.default_rng(0)
    set_numpy_generator_state(np_new, loaded["numpy"])
    # Assert
    assert np_new.random() == np_rng.random()
