"""FedAvg math (fedpsmos.federated.fedavg) on hand-made state dicts."""

from __future__ import annotations

import pytest
import torch

from fedpsmos.federated.fedavg import AggregationError, aggregate, check_states, fedavg_weights


def test_weighted_mean_uses_case_counts() -> None:
    # Prepare: two sites, 1 and 3 training cases -> weights 1/4 and 3/4
    a = {"w": torch.tensor([0.0, 4.0]), "b": torch.tensor(8.0)}
    b = {"w": torch.tensor([4.0, 0.0]), "b": torch.tensor(0.0)}
    # Execute
    out = aggregate([a, b], [1, 3])
    # Assert: hand-computed 0.25 * a + 0.75 * b
    assert torch.equal(out["w"], torch.tensor([3.0, 1.0]))
    assert torch.equal(out["b"], torch.tensor(2.0))
    assert fedavg_weights([1, 3]) == [0.25, 0.75]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtype_is_kept_and_sum_is_wide(dtype: torch.dtype) -> None:
    # Prepare: values whose float16 partial sums would round; the float64 sum then one cast does not
    values = [torch.tensor([1.0 + i / 1024], dtype=dtype) for i in range(3)]
    states = [{"p": v} for v in values]
    # Execute
    out = aggregate(states, [1, 1, 1])
    # Assert
    expected = (sum(v.double() for v in values) / 3).to(dtype)
    assert out["p"].dtype == dtype
    assert torch.equal(out["p"], expected)


def test_integer_buffers_take_the_maximum_and_bools_any() -> None:
    # Prepare
    a = {"num_batches_tracked": torch.tensor(7), "flag": torch.tensor([True, False])}
    b = {"num_batches_tracked": torch.tensor(12), "flag": torch.tensor([False, False])}
    # Execute
    out = aggregate([a, b], [5, 1])
    # Assert: documented policy, not a weighted mean (which would be 7.83)
    assert out["num_batches_tracked"].dtype == torch.int64
    assert int(out["num_batches_tracked"]) == 12
    assert out["flag"].tolist() == [True, False]


def test_identical_models_are_a_fixed_point() -> None:
    # Prepare: a real module's state dict, three identical copies, equal weights
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.InstanceNorm3d(4, affine=True))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    # Execute
    out = aggregate([state, state, state], [2, 2, 2])
    # Assert: the identity, bit for bit
    assert list(out) == list(state)
    for key in state:
        assert torch.equal(out[key], state[key]), key


def test_bad_counts_are_refused() -> None:
    with pytest.raises(AggregationError, match="positive"):
        aggregate([{"p": torch.ones(1)}], [0])
    with pytest.raises(AggregationError, match="no site"):
        fedavg_weights([])


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"a": torch.zeros(2)}, "missing key"),
        ({"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(1)}, "unexpected key"),
        ({"a": torch.zeros(3), "b": torch.zeros(3)}, "shape"),
        ({"a": torch.zeros(2, dtype=torch.float64), "b": torch.zeros(3)}, "dtype"),
        ({"a": torch.tensor([0.0, float("nan")]), "b": torch.zeros(3)}, "non-finite"),
        ({"a": torch.zeros(2), "b": torch.tensor([0.0, float("inf"), 0.0])}, "non-finite"),
    ],
)
def test_check_states_names_site_and_round(state: dict[str, torch.Tensor], message: str) -> None:
    # Prepare
    reference = {"a": torch.zeros(2), "b": torch.zeros(3)}
    good = {"a": torch.ones(2), "b": torch.ones(3)}
    # Execute / Assert
    check_states([good], reference, ["site1"], 4)
    with pytest.raises(AggregationError, match=f"round 4, site site2: .*{message}"):
        check_states([good, state], reference, ["site1", "site2"], 4)


def test_shared_storage_is_averaged_once_and_stays_shared() -> None:
    # Prepare: two keys viewing one storage per site (PlainConvUNet's encoder.* / decoder.encoder.*)
    a_t, b_t = torch.tensor([1.0, 3.0]), torch.tensor([3.0, 5.0])
    a = {"encoder.w": a_t, "decoder.encoder.w": a_t}
    b = {"encoder.w": b_t, "decoder.encoder.w": b_t}
    # Execute
    out = aggregate([a, b], [1, 1])
    # Assert
    assert torch.equal(out["encoder.w"], torch.tensor([2.0, 4.0]))
    assert out["decoder.encoder.w"].data_ptr() == out["encoder.w"].data_ptr()
