"""A linear probe: do the pretrained features tell the labels apart, better than random ones?

At the end of `pretrain`, when the images have labels: the frozen backbone's pooled features
of every labelled image (resized, normalised, no augmentation), a logistic regression, and
patient-grouped cross-validation (an image is never scored by a probe that saw its patient).
The same probe on the features of the untrained network (same architecture and seed) is the
baseline: a convolutional network's random features already carry some signal, so the gain
over them, not the AUC alone, says whether pretraining taught anything. Cheap (one forward
pass per image) and only a signal: fine-tuning decides.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import timm
import torch
from torch import nn

from embryo_ml.config import Config
from embryo_ml.data.cache import DecodedCache
from embryo_ml.data.preprocess import load_square, preprocess
from embryo_ml.data.splits import group_keys
from embryo_ml.train.pretrain_views import ViewSettings

log = logging.getLogger(__name__)
MAX_FOLDS = 5


def features(backbone: nn.Module, paths: list[str], settings: ViewSettings,
             cache: DecodedCache | None, device: torch.device, batch: int = 64) -> np.ndarray:
    """Pooled features of each image as the model sees it at evaluation (N x features)."""
    backbone.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(paths), batch):
            images = []
            for path in paths[start:start + batch]:
                source = cache.load(path) if cache is not None else load_square(
                    path, settings.size)
                images.append(preprocess(np.asarray(source), settings.size, settings.mean,
                                         settings.std))  # as the scorer does
            tensor = torch.from_numpy(np.stack(images)).to(device)
            out.append(backbone(tensor).float().cpu().numpy())
    return np.concatenate(out)


def probe_auc(x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> float:
    """Out-of-fold ROC AUC of a standardised logistic regression on `x`."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scores = np.zeros(len(y))
    splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
    for fit_rows, held in splitter.split(x, y, groups):
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        probe.fit(x[fit_rows], y[fit_rows])
        scores[held] = probe.predict_proba(x[held])[:, 1]
    return float(roc_auc_score(y, scores))


def linear_probe(cfg: Config, backbone: nn.Module, table: pd.DataFrame,
                 settings: ViewSettings, cache: DecodedCache | None,
                 device: torch.device) -> dict[str, float] | None:
    """{auc, random_init_auc, images, folds} for `data.positive_class` against the rest, or
    None (logged) when the labels cannot be probed (one class, too few patients)."""
    labelled = table[table["label"].notna()].reset_index(drop=True)
    y = (labelled["label"].astype(str) == cfg.data.positive_class).to_numpy(int)
    _, groups = group_keys(labelled)
    folds = min(MAX_FOLDS, len(set(groups)), int(y.sum()), int(len(y) - y.sum()))
    if folds < 2:
        log.info("linear probe skipped: needs images of class %r and others from at least 2 "
                 "patients", cfg.data.positive_class)
        return None
    paths = labelled["path"].tolist()
    trained = probe_auc(features(backbone, paths, settings, cache, device), y, groups, folds,
                        cfg.seed)
    torch.manual_seed(cfg.seed)
    untrained = timm.create_model(cfg.model.name, num_classes=0).to(device)
    baseline = probe_auc(features(untrained, paths, settings, cache, device), y, groups, folds,
                         cfg.seed)
    return {"auc": trained, "random_init_auc": baseline, "images": float(len(y)),
            "folds": float(folds)}
