"""The split evaluation of RCPS, CRC and Learn-Then-Test (:mod:`ConformalSegLib.evaluation.risk_control`)."""

from __future__ import annotations

import math

import numpy as np

from ConformalSegLib.conformal.crc import crc_cutoff
from ConformalSegLib.conformal.ltt import RiskData, ltt_test, parse_risks
from ConformalSegLib.conformal.rcps import rcps_cutoff
from ConformalSegLib.conformal.summaries import LesionSummaries
from ConformalSegLib.evaluation.risk_control import evaluate_risk_control, markdown_table


def _data(n: int, seed: int) -> RiskData:
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        p = 1 / (1 + np.exp(-(rng.normal(1.0, 1.0, int(rng.integers(1, 20))) + rng.normal())))
        cases.append((f"c{i}", np.sort(p.astype(np.float32))[::-1]))
    return RiskData(LesionSummaries.from_sorted(cases))


def test_one_split_is_the_methods_on_that_split() -> None:
    data = _data(80, 1)
    risks = parse_risks(["fnr=0.25"])
    rows = {r.method: r for r in evaluate_risk_control(data, epsilon=0.25, delta=0.2, risks=risks, splits=1, seed=3)}
    perm = np.random.default_rng(3).permutation(80)
    cal, test = data.voxels.subset(perm[:40]), data.voxels.subset(perm[40:])
    expected = {
        "crc": crc_cutoff(cal, 0.25),
        "rcps-hb": rcps_cutoff(cal, 0.25, 0.2),
        "rcps-wsr": rcps_cutoff(cal, 0.25, 0.2, bound="wsr"),
        "ltt": ltt_test(RiskData(cal), risks, 0.2).threshold,
    }
    assert expected["ltt"] == expected["rcps-hb"]
    for method, cut in expected.items():
        assert rows[method].mean_threshold == cut
        fnr = np.mean([np.count_nonzero(test.case(i) < cut) / test.case(i).size for i in range(test.n)])
        assert math.isclose(rows[method].mean_test_fnr, fnr, rel_tol=1e-12)
        assert rows[method].held == float(fnr <= 0.25)


def test_rcps_is_more_conservative_than_crc_and_the_table_prints() -> None:
    rows = {r.method: r for r in evaluate_risk_control(_data(100, 2), epsilon=0.2, delta=0.1, splits=30, seed=0)}
    assert set(rows) == {"crc", "rcps-hb", "rcps-wsr"}
    assert rows["rcps-hb"].mean_threshold <= rows["rcps-wsr"].mean_threshold <= rows["crc"].mean_threshold
    assert rows["rcps-hb"].held >= rows["crc"].held
    assert "| rcps-wsr |" in markdown_table(list(rows.values()))


def test_cli_evaluate_writes_the_risk_control_table(tmp_path) -> None:
    from ConformalSegLib.cli import main
    from ConformalSegLib.phantoms.simulated_dataset import write_synthetic_dataset

    data = tmp_path / "data"
    write_synthetic_dataset(data, 12, seed=5, shape=(16, 24, 24))
    argv = ["evaluate", "--data", data, "--lesion-label", "2", "--splits", "3", "--epsilons", "0.3", "--alphas", "0.2"]
    argv += ["--no-hd95", "--no-false-positives", "--transforms", "identity", "--risk-delta", "0.3"]
    argv += ["--risk", "fnr=0.4", "--risk", "fp-ml=2", "--fp-ml-cap", "10", "--out", tmp_path / "ev"]
    assert main([str(a) for a in argv]) == 0
    table = (tmp_path / "ev" / "risk_control.md").read_text()
    for method in ("crc", "rcps-hb", "rcps-wsr", "ltt"):
        assert f"| {method} |" in table
    assert "fp-ml" in table
