"""The promotion's side-by-side report, read back from a real `mlflow server` as the UI shows
it: logged to the challenger's run, linked from its version (tag and description), written
for a refused promotion too, with one section per external set both versions were scored on."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request

import numpy as np
import pytest

from cxr_core.lifecycle.comparison_report import EXTERNAL_DIR, EXTERNAL_FILE
from cxr_core.lifecycle.promotion import PromotionRejected, promote
from cxr_core.lifecycle.registry import CHAMPION, PROMOTION_REPORT_TAG

pytestmark = pytest.mark.integration


def _artifact(server, run_id: str, path: str) -> str:
    """An artifact's text through the server's artifact proxy (what the UI's viewer reads)."""
    query = urllib.parse.urlencode({"run_id": run_id, "path": path})
    with urllib.request.urlopen(f"{server.url}/get-artifact?{query}", timeout=30) as resp:
        return resp.read().decode()


def test_promotion_logs_the_side_by_side_report(server, client, registrar, model_name) -> None:
    hashes = registrar.hashes(0, 60)
    champ_ok = np.ones(60, bool)
    champ_ok[[1, 3]] = False  # the champion misses two PNEUMONIA images
    _, v1 = registrar.candidate(model_name, registrar.predictions(hashes, champ_ok), with_model=False)
    promote(client, model_name, v1)
    cand_ok = np.ones(60, bool)
    cand_ok[[0]] = False  # the challenger misses one NORMAL image
    run2, v2 = registrar.candidate(model_name, registrar.predictions(hashes, cand_ok), with_model=False)
    promote(client, model_name, v2, actor="ci")
    mv = client.get_model_version(model_name, v2)
    link = mv.tags[PROMOTION_REPORT_TAG]
    assert link == f"runs:/{run2}/promotion/vs-champion-v{v1}.md"
    assert "Side-by-side report" in mv.description and "Gate decision: PASSED" in mv.description
    report = _artifact(server, run2, f"promotion/vs-champion-v{v1}.md")
    for expected in (f"v{v2} (candidate)", f"v{v1} (champion)", "**Outcome: promoted", "McNemar",
                     "Confusion matrices", "worst cases", "Shared test images (60 images"):
        assert expected in report
    data = json.loads(_artifact(server, run2, f"promotion/vs-champion-v{v1}.json"))
    shared = data["sets"]["Shared test images"]
    assert shared["evaluations"]["candidate"]["confusion"] == {"tn": 29, "fp": 1, "fn": 0, "tp": 30}
    assert shared["evaluations"]["champion"]["confusion"] == {"tn": 30, "fp": 0, "fn": 2, "tp": 28}
    assert [w["sha256"] if "sha256" in w else w["path"] for w in shared["worst"]["champion"]] == [
        f"/t/{hashes[i][-6:]}.jpeg" for i in (1, 3)]
    assert shared["mcnemar"][0]["champion_only"] == 1 and shared["mcnemar"][0]["candidate_only"] == 2
    model = client.get_registered_model(model_name)
    assert f"`champion`: version {v2}" in model.description
    assert f"`previous-champion`: version {v1}" in model.description


def test_a_refused_promotion_still_explains_itself(server, client, registrar, model_name) -> None:
    hashes = registrar.hashes(0, 60)
    _, v1 = registrar.candidate(model_name, registrar.predictions(hashes), with_model=False)
    promote(client, model_name, v1)
    worse = np.ones(60, bool)
    worse[:30] = False
    run2, v2 = registrar.candidate(model_name, registrar.predictions(hashes, worse), with_model=False)
    with pytest.raises(PromotionRejected, match="regresses"):
        promote(client, model_name, v2)
    assert client.get_model_version_by_alias(model_name, CHAMPION).version == v1
    report = _artifact(server, run2, f"promotion/vs-champion-v{v1}.md")
    assert "**Outcome: not promoted: significant regression" in report and "FAILED" in report
    assert "not promoted" in client.get_model_version(model_name, v2).description


def test_each_external_set_is_one_more_section(server, client, registrar, model_name) -> None:
    hashes, external = registrar.hashes(0, 40), registrar.hashes(500, 540)
    runs = []
    for _ in range(2):
        run_id, version = registrar.candidate(model_name, registrar.predictions(hashes), with_model=False)
        client.log_text(run_id, registrar.predictions(external).to_csv(index=False),
                        f"{EXTERNAL_DIR}/site-b/{EXTERNAL_FILE}")
        runs.append((run_id, version))
        if len(runs) == 1:
            promote(client, model_name, version)
    (run2, v2), v1 = runs[1], runs[0][1]
    promote(client, model_name, v2)
    report = _artifact(server, run2, f"promotion/vs-champion-v{v1}.md")
    assert "## External set site-b (40 images both were scored on)" in report
    data = json.loads(_artifact(server, run2, f"promotion/vs-champion-v{v1}.json"))
    assert set(data["sets"]) == {"Shared test images", "External set site-b"}
