"""The export <-> service contract's value rules (features/contract.py)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from features.contract import (
    NULL_INT,
    NULL_STRING,
    OUTPUT,
    Fusion,
    as_input,
    graph_output,
    parse_id,
)


def test_ids_that_do_not_parse_are_missing_never_an_error() -> None:
    assert parse_id(" 42 ", "int64") == 42 and parse_id("-7", "int64") == -7
    for value in ("²", "4" * 5000, "1e3", "", "x", 2**70, 1.5, -(2**63)):
        assert parse_id(value, "int64") == NULL_INT, value
    assert parse_id(3.0, "int64") == 3
    assert parse_id(12, "string") == "12"


def test_a_list_column_keeps_its_most_recent_values_right_aligned() -> None:
    lists = pl.Series([[1, 2, 3, 4], [], None, [None, 9]], dtype=pl.List(pl.Int64))
    got = as_input(lists, "int64", length=3)
    expected = np.array(
        [[2, 3, 4], [NULL_INT] * 3, [NULL_INT] * 3, [NULL_INT, NULL_INT, 9]], dtype=np.int64
    )
    np.testing.assert_array_equal(got, expected)
    strings = as_input(pl.Series([["a"], ["b", "c"]]), "string", length=2)
    assert strings.tolist() == [[NULL_STRING, "a"], ["b", "c"]]


def test_missing_markers_survive_as_arrays() -> None:
    from features.contract import missing

    assert missing(2, "string").tolist() == [NULL_STRING, NULL_STRING]
    assert missing((1, 2), "int64").tolist() == [[NULL_INT, NULL_INT]]
    assert np.isnan(missing(1, "float64")).all()


def test_graph_outputs_are_named_from_the_model_outputs() -> None:
    assert OUTPUT == graph_output("logits") == "probabilities"
    assert graph_output("arm_logits") == "arm_probabilities"
    assert graph_output("embedding_norm") == "embedding_norm"  # not logits: as it is
    assert graph_output("pseudologits") == "pseudologits"  # only "logits" or "_logits"


def test_fusion_weighs_only_the_tasks_named_and_every_task_when_none_is() -> None:
    tasks = ["click", "like", "follow"]
    p = np.array([[0.5, 0.2, 0.9], [0.1, 0.8, 0.3]])
    np.testing.assert_allclose(Fusion().vector(tasks), [1, 1, 1])
    np.testing.assert_allclose(Fusion()(p, Fusion().vector(tasks)), p.sum(1))
    named = Fusion("sum", {"click": 1, "like": 4})
    np.testing.assert_allclose(named.vector(tasks), [1, 4, 0])
    np.testing.assert_allclose(named(p, named.vector(tasks)), p[:, 0] + 4 * p[:, 1])
    product = Fusion("product", {"click": 1, "like": 2})
    np.testing.assert_allclose(product(p, product.vector(tasks)), p[:, 0] * p[:, 1] ** 2)
    with pytest.raises(ValueError, match=r"name tasks the model lacks: \['clik'\]"):
        Fusion("sum", {"clik": 1}).vector(tasks)
    with pytest.raises(ValueError, match=r"must be finite numbers: \['like'\]"):
        Fusion("sum", {"like": float("inf")})
    with pytest.raises(ValueError, match="fusion must be one of"):
        Fusion("max")
