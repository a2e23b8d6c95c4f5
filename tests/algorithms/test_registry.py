"""The algorithm registry and the config agree on every algorithm."""

from __future__ import annotations

import pytest

from tailorpo.algorithms.registry import ALGORITHMS
from tailorpo.config import ALGORITHM_FACTS, ALGORITHM_NAMES, AlgorithmConfig, load_config


def test_the_config_accepts_exactly_the_registered_algorithms():
    """config validation must know an algorithm's name and facts before the registry's heavy imports load, so
    it keeps its own table: this pins the two together."""
    assert tuple(ALGORITHMS) == ALGORITHM_NAMES
    assert all(ALGORITHMS[name].facts is ALGORITHM_FACTS[name] for name in ALGORITHM_NAMES)
    assert set(AlgorithmConfig.model_fields["name"].annotation.__args__) == set(ALGORITHMS)


@pytest.mark.parametrize("name", ALGORITHM_NAMES)
def test_a_pair_objective_and_its_facts_say_the_same(name):
    spec = ALGORITHMS[name]
    assert (spec.pair_objective is not None) == spec.facts.pair_objective


def test_offline_pairs_go_to_the_pair_loop_only_for_pair_objectives():
    assert load_config("launch/tiny.yaml", ["algorithm.name=mapo", "pairs.source=x"]).reads_offline_pairs
    assert not load_config("launch/tiny.yaml", ["algorithm.name=mapo"]).reads_offline_pairs
    assert not load_config("launch/tiny.yaml", ["algorithm.name=d3po", "pairs.source=x"]).reads_offline_pairs
