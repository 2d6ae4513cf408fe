"""`pretrain`: self-supervised pretraining of the training backbone on unlabelled images.

Hospital networks are often offline and ImageNet weights may not suit microscope images; every
clinic has far more unlabelled embryo images than labelled ones. `pretrain` teaches the timm
backbone of `model.name` at `data.image_size` to give two views of one embryo the same features
(SimSiam, `embryo_ml.train.pretrain_model`; views in `embryo_ml.train.pretrain_views`) and
writes its weights as `.safetensors`, which `train` loads with `model.pretrained_file` and
fine-tunes by the fine-tuning rules (`embryo_ml.train.recipe`).

The file's metadata records what it was made from (`embryo_ml.train.pretrain_data`), so that
`train` can warn when its validation patients were in the pretraining set.

Work is never lost: after every epoch the run's state goes to `OUT.resume.pt` (atomically), and
`resume=True` continues the same curve (the views depend only on seed, epoch and image). The
optimiser: AdamW with linear warm-up and cosine decay. SGD at the paper's rate barely moved the
loss in the ~100 steps a clinic's few hundred images give (-0.03 after 3 epochs against -0.41).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from embryo_ml.config import Config
from embryo_ml.data.cache import DecodedCache
from embryo_ml.errors import ConfigError, DataError, ImageReadError
from embryo_ml.fileio import atomic_path
from embryo_ml.train.fit import pick_device
from embryo_ml.train.models import build_model_with_source, model_normalization
from embryo_ml.train.pretrain_data import (
    COLLAPSE_SPREAD,
    Exclusion,
    PretrainRecord,
    PretrainSet,
    collect_images,
    id_hash,
    pair_partners,
)
from embryo_ml.train.pretrain_model import SimSiam, output_spread
from embryo_ml.train.pretrain_views import PretrainImages, ViewSettings
from embryo_ml.train.tracking import RunTracker
from embryo_ml.train.trainer import warmup_cosine, worker_count

log = logging.getLogger(__name__)

METHOD = "simsiam"
RESUME_SUFFIX = ".resume.pt"
RESUME_FORMAT = 1


def resume_path(out: str | os.PathLike[str]) -> Path:
    return Path(str(out) + RESUME_SUFFIX)


@dataclass
class PretrainResult:
    weights: Path
    record: PretrainRecord
    history: list[dict[str, float]] = field(default_factory=list)
    run_id: str | None = None
    warnings: list[str] = field(default_factory=list)


def prepare_images(dataset: PretrainImages, progress: bool) -> None:
    """Decode every image once (this fills the decoded cache) and find its embryo, in this
    process, before DataLoader workers copy the dataset: one clear error for the first
    unreadable image before any training, instead of a crash hours in."""
    bad: list[str] = []
    for index in _progress(range(len(dataset)), progress, "reading images"):
        try:
            dataset.box(index, dataset.source(index))
        except ImageReadError as error:
            bad.append(str(error))
    if bad:
        raise DataError(f"{len(bad)} of {len(dataset)} images cannot be read (first: {bad[0]}); "
                        "remove them, or list the readable ones in a manifest")


def _progress(items: Any, enabled: bool, desc: str) -> Any:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


class _Run:
    """The network, optimiser and schedule of one pretraining run, and their saved state."""

    def __init__(self, cfg: Config, steps_per_epoch: int, device: torch.device) -> None:
        torch.manual_seed(cfg.seed)
        # no dropout on the pooled features: SimSiam compares them, and no random stream
        # besides the views' then shapes the curve (resume continues it exactly)
        backbone, weights = build_model_with_source(
            cfg.model.model_copy(update={"drop_rate": 0.0}), num_classes=0)
        self.weights_source = weights
        self.mean, self.std = model_normalization(backbone)
        p = cfg.pretrain
        self.model = SimSiam(backbone, p.projection_dim, p.predictor_dim).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=p.lr,
                                           weight_decay=p.weight_decay)
        total = p.epochs * steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(total, p.warmup_epochs * steps_per_epoch))

    def state(self, epoch: int, history: list[dict[str, float]], data_fingerprint: str,
              config: dict[str, Any], run_id: str | None) -> dict[str, Any]:
        return {"format_version": RESUME_FORMAT, "epoch": epoch, "history": history,
                "fingerprint": data_fingerprint, "config": config, "run_id": run_id,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "torch_rng": torch.get_rng_state()}

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])


def _loader(dataset: PretrainImages, cfg: Config, epoch: int, device: torch.device
            ) -> torch.utils.data.DataLoader:
    """This epoch's batches: the order is drawn from (seed, epoch) alone, as the views are."""
    generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    batch = min(cfg.pretrain.batch_size, len(dataset))
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=True, drop_last=True, generator=generator,
        num_workers=worker_count(cfg, device))  # drop_last: a batch of 1 breaks BatchNorm


def read_resume(path: Path) -> dict[str, Any]:
    """The interrupted run's state in `OUT.resume.pt`; one DataError when it is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated or not ours
        raise DataError(f"--resume: {path} is damaged ({type(error).__name__}); delete it to "
                        "start again") from None
    if not isinstance(state, dict) or state.get("format_version") != RESUME_FORMAT:
        raise DataError(f"--resume: {path} is not a pretraining checkpoint of this version")
    return state


def _check_resumable(state: dict[str, Any], path: Path, data_fingerprint: str,
                     config: dict[str, Any]) -> None:
    """Resuming must continue the same run: same images, same settings (more epochs may be
    asked for)."""
    if state["fingerprint"] != data_fingerprint:
        raise DataError(f"--resume: the images differ from those of the interrupted run "
                        f"({path}); pretrain them under a new --out")

    def settings(tree: dict[str, Any]) -> dict[str, Any]:
        return {"seed": tree.get("seed"), "model": tree.get("model"), "data": tree.get("data"),
                "pretrain": {k: v for k, v in tree.get("pretrain", {}).items() if k != "epochs"}}

    before, now = settings(state["config"]), settings(config)
    changed = next((k for k in before if before[k] != now[k]), None)
    if changed:
        raise ConfigError(f"--resume: the config differs from the interrupted run's in "
                          f"'{changed}'; resume with the same settings")


def _epoch(run: _Run, loader: torch.utils.data.DataLoader, device: torch.device,
           progress: bool, epoch: int) -> dict[str, float]:
    run.model.train()
    losses, spreads = [], []
    for first, second in _progress(loader, progress, f"epoch {epoch}"):
        loss, projections = run.model(first.to(device), second.to(device))
        if not math.isfinite(loss.item()):
            raise DataError(f"epoch {epoch}: the loss became {loss.item()}; lower pretrain.lr")
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        run.scheduler.step()
        losses.append(loss.item())
        spreads.append(output_spread(projections))
    return {"epoch": epoch, "loss": float(np.mean(losses)),
            "output_spread": float(np.mean(spreads)),
            "lr": float(run.optimizer.param_groups[0]["lr"])}


def learning_warnings(history: list[dict[str, float]]) -> list[str]:
    """Plain warnings when the run did not learn: collapsed outputs, or a loss that never
    fell (SimSiam's loss starts near 0 and falls towards -1 as views agree)."""
    if not history:
        return []
    found = []
    last = history[-1]
    if last["output_spread"] < COLLAPSE_SPREAD:
        found.append(f"the network collapsed (output spread {last['output_spread']:.3f}, "
                     "healthy is about 1): every image gets nearly the same features; try a "
                     "lower pretrain.lr or more varied images")
    if len(history) >= 3 and last["loss"] > history[0]["loss"] - 0.05:
        found.append(f"the loss did not fall (from {history[0]['loss']:.3f} to "
                     f"{last['loss']:.3f}): the features learned little; try more epochs or "
                     "a higher pretrain.lr")
    return found


def probe_warnings(probe: dict[str, float] | None) -> list[str]:
    """A warning when the pretrained features tell the labels apart no better than the
    untrained network's (the probe's baseline)."""
    if not probe or probe["auc"] > probe["random_init_auc"]:
        return []
    return [f"the linear probe found no gain over an untrained network (ROC AUC "
            f"{probe['auc']:.3f} vs {probe['random_init_auc']:.3f}): these features may not "
            "help fine-tuning; compare with training from scratch before relying on them"]


def _id_hashes(table: pd.DataFrame) -> dict[str, list[str]]:
    hashes = {}
    for column in ("patient_id", "embryo_id"):
        if column in table.columns:
            values = table[column].dropna().astype(str).unique()
            hashes[column] = sorted(id_hash(column, v) for v in values)
    return hashes


def save_weights(backbone: torch.nn.Module, record: PretrainRecord, out: Path) -> None:
    """The backbone's tensors and the record, as one `.safetensors` file (atomically)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=record.to_metadata())


def pretrain(cfg: Config, sources: list[str | os.PathLike[str]], out: str | os.PathLike[str],
             exclusion: Exclusion | None = None, resume: bool = False, progress: bool = True,
             track: bool = True) -> PretrainResult:
    """Pretrain `cfg.model` on the images of `sources` and write its backbone to `out`, as
    an MLflow run (`cfg.tracking`; `track=False`: none). A resumed run continues its MLflow
    run."""
    out = Path(out)
    _check_out(out, resume)
    state = read_resume(resume_path(out)) if resume else None
    if not track:
        return _pretrain(cfg, sources, out, exclusion, state, progress, None)
    with RunTracker(cfg.tracking.tracking_uri, cfg.tracking.experiment,
                    run_name=f"pretrain-{out.stem}",
                    run_id=state.get("run_id") if state else None) as tracker:
        tracker.set_tags({"embryo_ml.stage": "pretrain"})
        return _pretrain(cfg, sources, out, exclusion, state, progress, tracker)


def _check_out(out: Path, resume: bool) -> None:
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {out}: pretrained weights are written as .safetensors")
    checkpoint = resume_path(out)
    if out.exists() and not resume:
        raise DataError(f"{out} exists: choose another --out, or delete it first")
    if checkpoint.exists() and not resume:
        raise DataError(f"{checkpoint} holds an interrupted run: pass --resume to continue it, "
                        "or delete it to start again")
    if resume and not checkpoint.exists():
        raise DataError(f"--resume: no interrupted run at {checkpoint}")


@dataclass
class _Parts:
    run: _Run
    dataset: PretrainImages
    settings: ViewSettings
    cache: DecodedCache | None
    device: torch.device


def _build(cfg: Config, images: PretrainSet) -> _Parts:
    device = pick_device(cfg.train.device)
    size = cfg.data.image_size
    batch = min(cfg.pretrain.batch_size, len(images.table))
    run = _Run(cfg, len(images.table) // batch, device)
    settings = ViewSettings.from_config(cfg.pretrain, size, cfg.data.mean or run.mean,
                                        cfg.data.std or run.std)
    cache = (DecodedCache(cfg.data.cache_dir, 2 * size, cfg.data.max_pixels)
             if cfg.data.cache_dir else None)
    dataset = PretrainImages(images.table["path"].tolist(),
                             pair_partners(images.table, cfg.pretrain.pair_window), settings,
                             cfg.seed, cfg.pretrain.pair_p, cache, cfg.data.max_pixels)
    return _Parts(run, dataset, settings, cache, device)


def _pretrain(cfg: Config, sources: list[str | os.PathLike[str]], out: Path,
              exclusion: Exclusion | None, state: dict[str, Any] | None, progress: bool,
              tracker: RunTracker | None) -> PretrainResult:
    """The run; `state` is the interrupted run's (`read_resume`), or None for a new one."""
    checkpoint = resume_path(out)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    images = collect_images(sources, exclusion)
    parts = _build(cfg, images)
    config = cfg.model_dump(mode="json")
    history: list[dict[str, float]] = []
    if state is not None:
        _check_resumable(state, checkpoint, images.fingerprint, config)
        parts.run.restore(state)
        history = list(state["history"])
        log.info("resuming %s after epoch %d", checkpoint, len(history) - 1)
    prepare_images(parts.dataset, progress)
    if state is None and tracker is not None:
        tracker.log_params({**cfg.flat(), "pretrain.images": len(images.table),
                            "pretrain.excluded": images.excluded,
                            "pretrain.method": METHOD, "data.sha256": images.fingerprint})
    log.info("pretraining %s at %d px on %d images (%d excluded), %s, %d epochs",
             cfg.model.name, cfg.data.image_size, len(images.table), images.excluded, METHOD,
             cfg.pretrain.epochs)
    for epoch in range(len(history), cfg.pretrain.epochs):
        started = time.perf_counter()
        parts.dataset.epoch = epoch
        loader = _loader(parts.dataset, cfg, epoch, parts.device)
        row = _epoch(parts.run, loader, parts.device, progress, epoch)
        row["seconds"] = time.perf_counter() - started
        history.append(row)
        with atomic_path(checkpoint, durable=False) as tmp:
            torch.save(parts.run.state(epoch, history, images.fingerprint, config,
                                       getattr(tracker, "run_id", None)), tmp)
        if tracker is not None:
            tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
        if progress:
            print(f"epoch {epoch}: loss {row['loss']:.4f}, output spread "
                  f"{row['output_spread']:.3f} ({row['seconds']:.0f} s)", flush=True)
    return _finish(cfg, parts, images, history, out, tracker)


def _finish(cfg: Config, parts: _Parts, images: PretrainSet, history: list[dict[str, float]],
            out: Path, tracker: RunTracker | None) -> PretrainResult:
    """The record, the linear probe where there are labels, the weights file; the resume
    checkpoint goes only once the weights are written."""
    last = history[-1] if history else {}
    record = PretrainRecord(
        cfg.model.name, cfg.data.image_size, list(parts.settings.mean),
        list(parts.settings.std), METHOD, cfg.pretrain.epochs, len(images.table),
        images.fingerprint, images.digests, _id_hashes(images.table), images.excluded,
        last.get("loss"), last.get("output_spread"))
    result = PretrainResult(out, record, history, getattr(tracker, "run_id", None),
                            learning_warnings(history))
    if cfg.pretrain.probe and "label" in images.table.columns:
        from embryo_ml.train.pretrain_probe import linear_probe

        record.probe = linear_probe(cfg, parts.run.model.backbone, images.table,
                                    parts.settings, parts.cache, parts.device)
        result.warnings += probe_warnings(record.probe)
    save_weights(parts.run.model.backbone, record, out)
    resume_path(out).unlink(missing_ok=True)
    if tracker is not None:
        tracker.log_metrics({f"probe_{k}": v for k, v in (record.probe or {}).items()})
        tracker.log_dict({"history": history, "warnings": result.warnings},
                         "pretrain_history.json")
    return result
