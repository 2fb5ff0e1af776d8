"""Shortcut audits: how well a property that is not the lungs alone separates the classes."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cxr_core.data.labels import LABELS, POSITIVE


def shortcut_auc(manifest: pd.DataFrame, seed: int = 0) -> float | None:
    """Cross-validated ROC-AUC of a logistic regression on image size alone.

    A high value means width/height/aspect give the class away: a model can learn the
    scanner or the resize history instead of the lungs. None when there is too little data.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    ok = manifest[manifest["readable"] & manifest["label"].isin(LABELS)]
    y = (ok["label"] == POSITIVE).to_numpy(int)
    if len(ok) < 20 or min(y.sum(), len(y) - y.sum()) < 5:
        return None
    w = ok["width"].to_numpy(float)
    h = ok["height"].to_numpy(float)
    x = np.column_stack([np.log(w), np.log(h), np.log(w / h)])
    if np.allclose(x.std(axis=0), 0):
        return 0.5  # every image the same size: size carries no information
    cv = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    proba = cross_val_predict(model, x, y, cv=cv, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, proba))
