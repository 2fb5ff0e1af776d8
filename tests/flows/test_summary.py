"""The Prefect summary of a retrain run (a markdown artifact): test metrics, each external
set beside them with the gap, the site threshold and the gates."""

from __future__ import annotations

import numpy as np

from cxr_core.evaluation.external import SiteThreshold
from cxr_core.evaluation.gates import GateThresholds, decide
from cxr_core.evaluation.metrics import evaluate_predictions


def test_summary_shows_external_sets_with_the_gap_and_the_site_threshold() -> None:
    from flows.retrain import _summary_markdown

    y = np.arange(40) % 2
    test = evaluate_predictions(y, np.where(y == 1, 0.9, 0.1), 0.5, n_bootstrap=20)
    p = np.where(y == 1, 0.9, 0.1)
    p[1:20:2] = 0.2  # 10 of 20 PNEUMONIA images missed: recall 0.5
    result = {"model_version": None, "mlflow_run_url": "u", "run_dir": "/r", "threshold": 0.5}
    site = SiteThreshold(threshold=0.3, recall=0.95, specificity=0.8, recall_target=0.97,
                         n_positive=20, n_negative=20, source="/site")
    decision = decide(test.metrics, GateThresholds(external={"site-b": {"recall": 0.9}}),
                      external={"site-b": evaluate_predictions(y, p, 0.5, n_bootstrap=20).metrics})
    text = _summary_markdown(result, decision, test,
                             {"site-b": evaluate_predictions(y, p, 0.5, n_bootstrap=20)}, site)
    assert "## External validation" in text and "| external: site-b | 40 |" in text
    assert "| site-b | 40 | -0.250 | -0.500 | +0.000 |" in text
    assert "Site threshold 0.3000 for `/site`" in text
    assert "[FAIL] external_site-b_min_recall: 0.5000 >= 0.9000" in text
    plain = _summary_markdown(result, decision, test)
    assert "No external set was scored" in plain and "Site threshold" not in plain
