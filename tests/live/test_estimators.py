"""The recalibration methods, their estimator objects and the typed pass options."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bnaudit.bn.stats import ChannelStats
from bnaudit.errors import UsageError
from bnaudit.live.estimators import ESTIMATORS, BatchMeanEstimator, LayerSums, PopulationEstimator
from bnaudit.live.methods import RecalibrationMethod, choices
from bnaudit.live.options import RecalibrationOptions


def _sums(chunks: list[np.ndarray]) -> LayerSums:
    """LayerSums of per-call inputs (rows: values, columns: channels), folded call by call."""
    sums = LayerSums.empty(chunks[0].shape[1])
    for chunk in chunks:
        one = ChannelStats.from_moments(len(chunk), chunk.mean(0), chunk.var(0))
        mean, var = chunk.mean(0), chunk.var(0, ddof=1)
        sums = sums.merge(LayerSums(one, 1, mean, var, mean**2, var**2))
    return sums


@pytest.fixture
def chunks() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(loc=i, scale=1 + i, size=(n, 3)) for i, n in enumerate((5, 9, 2, 7))]


def test_every_method_string_maps_to_an_estimator() -> None:
    assert choices() == ("population", "batch-mean")
    assert set(ESTIMATORS) == set(RecalibrationMethod)
    assert isinstance(ESTIMATORS[RecalibrationMethod.parse("population")], PopulationEstimator)
    assert isinstance(ESTIMATORS[RecalibrationMethod.parse("batch-mean")], BatchMeanEstimator)
    for name in choices():
        method = RecalibrationMethod.parse(name)
        assert method.value == name and RecalibrationOptions(method=name).chosen_method is method


def test_an_unknown_method_is_a_usage_error_naming_the_choices() -> None:
    with pytest.raises(UsageError) as info:
        RecalibrationMethod.parse("mean")
    assert info.value.fields.where == "--method"
    assert info.value.fields.found == "'mean'"
    assert "population" in info.value.fields.problem and "batch-mean" in info.value.fields.problem
    with pytest.raises(UsageError, match="--method"):
        RecalibrationOptions(method="median")


def test_population_is_the_pooled_mean_and_unbiased_variance(chunks: list[np.ndarray]) -> None:
    mean, var = PopulationEstimator().estimate(_sums(chunks))
    every = np.concatenate(chunks)
    np.testing.assert_allclose(mean, every.mean(0), rtol=1e-12)
    np.testing.assert_allclose(var, every.var(0, ddof=1), rtol=1e-12)


def test_batch_mean_averages_per_call_means_and_unbiased_variances(chunks: list[np.ndarray]) -> None:
    mean, var = BatchMeanEstimator().estimate(_sums(chunks))
    np.testing.assert_allclose(mean, np.mean([c.mean(0) for c in chunks], axis=0), rtol=1e-12)
    np.testing.assert_allclose(var, np.mean([c.var(0, ddof=1) for c in chunks], axis=0), rtol=1e-12)
    population_var = np.concatenate(chunks).var(0, ddof=1)
    assert np.all(var < population_var)  # the spread between the calls' means is left out


def test_layer_sums_round_trip_through_their_packed_form(chunks: list[np.ndarray]) -> None:
    sums = _sums(chunks)
    flat = sums.pack()
    assert flat.shape == (LayerSums.packed_size(3),)
    back = LayerSums.unpack(flat, 3)
    assert back.calls == 4 and back.population.count == sum(len(c) for c in chunks)
    for a, b in zip(PopulationEstimator().estimate(back), PopulationEstimator().estimate(sums), strict=True):
        np.testing.assert_array_equal(a, b)


def test_noise_is_the_batch_means_variance_of_the_averages(chunks: list[np.ndarray]) -> None:
    noise = _sums(chunks).noise()
    assert noise is not None
    means = np.array([c.mean(0) for c in chunks])
    variances = np.array([c.var(0, ddof=1) for c in chunks])
    # Independent float64 reference: the sample variance across calls over the number of calls.
    np.testing.assert_allclose(noise[0], means.var(0, ddof=1) / len(chunks), rtol=1e-10)
    np.testing.assert_allclose(noise[1], variances.var(0, ddof=1) / len(chunks), rtol=1e-10)
    assert _sums(chunks[:1]).noise() is None  # one call: no spread to measure
    back = LayerSums.unpack(_sums(chunks).pack(), 3).noise()
    assert back is not None and all(np.array_equal(a, b) for a, b in zip(back, noise, strict=True))


def test_options_are_frozen_and_checked() -> None:
    options = RecalibrationOptions(method="batch-mean", max_batches=3)
    assert options.method is RecalibrationMethod.BATCH_MEAN and options.chosen_method.value == "batch-mean"
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.max_batches = 4  # type: ignore[misc]
    assert dataclasses.replace(options, write=False).method is RecalibrationMethod.BATCH_MEAN
    for field, option in (("max_batches", "--max-batches"), ("max_samples", "--max-samples")):
        with pytest.raises(UsageError) as info:
            RecalibrationOptions(**{field: 0})
        assert info.value.fields.where == option and info.value.fields.found == "0"
    with pytest.raises(UsageError) as amp:
        RecalibrationOptions(amp_dtype="float16")
    assert amp.value.fields.where == "--amp-dtype" and amp.value.fields.problem == "needs --amp"


def test_the_command_line_offers_the_same_method_strings() -> None:
    from bnaudit.cli.drift_cmd import drift_command
    from bnaudit.cli.recalibrate_cmd import recalibrate_command

    for command in (recalibrate_command, drift_command):
        (method,) = [p for p in command.params if p.name == "method"]
        assert list(method.type.choices) == list(choices())  # type: ignore[attr-defined]
        assert method.default == RecalibrationMethod.POPULATION.value
