"""The experiment report's claim checks, on hand-made cells (no training)."""

import math

import pytest

from q3r.experiments import report


def _cell(acc):
    return ({"run": "r"}, {"test_acc": acc, "model_params": 100, "target_params": 10})


def test_two_standard_errors_of_a_difference():
    # 2 * sqrt(0.8 * 0.2 / 10000 + 0.8 * 0.2 / 10000) = 1.131... points
    assert report.two_standard_errors(0.8, 0.8, 10_000) == pytest.approx(200 * math.sqrt(2 * 0.16 / 10_000))
    assert report.two_standard_errors(0.8, 0.8, None) is None


def test_claims_flag_margins_inside_the_noise():
    cells = {"qkv": {
        "dense+SVD": {1.0: _cell(0.85), 0.4: _cell(0.845)},
        "Q3R (trained at 40%)": {1.0: _cell(0.86), 0.4: _cell(0.80)},
        "LoRA from scratch": {0.4: _cell(0.70)},
    }}
    checks = {c["claim"]: c for c in report.check_claims(cells, n_test=10_000)}
    drop = checks["Q3R loses <= 1.3 points at 40% kept"]
    assert drop["value"] == pytest.approx(6.0) and not drop["holds"] and not drop["within_noise"]
    dense = checks["Q3R beats dense+SVD at 40% kept"]
    assert dense["value"] == pytest.approx(-4.5) and not dense["holds"] and not dense["within_noise"]
    lora = checks["Q3R beats LoRA from scratch at 40% kept"]
    assert lora["holds"] and not lora["within_noise"]

    close = {"qkv": {"dense+SVD": {0.4: _cell(0.801)}, "Q3R (trained at 40%)": {1.0: _cell(0.80), 0.4: _cell(0.80)}}}
    beat = {c["claim"]: c for c in report.check_claims(close, n_test=10_000)}["Q3R beats dense+SVD at 40% kept"]
    assert not beat["holds"] and beat["within_noise"]
    assert "(within 2 s.e.)" in report.markdown(close, report.check_claims(close, 10_000), {})
