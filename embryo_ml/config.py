"""Typed run configuration: a pydantic schema, YAML loading and `--set a.b=c` overrides.

Every section forbids unknown keys, so a typo (`train.epoch`) fails before any work starts, with
the key, the file and the closest valid name in the message.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from embryo_ml.config_text import read_config_text, read_yaml
from embryo_ml.errors import ConfigError
from embryo_ml.fileio import atomic_write_text


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = Field("resnet18", description="timm model name")
    pretrained: bool = Field(False, description="load timm hub weights (needs cache or network)")
    pretrained_file: str | None = Field(
        None, description="local .safetensors/.pth weights for offline networks"
    )
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0)


class DataConfig(_Section):
    manifest: str | None = Field(None, description="manifest CSV or folder-per-class tree")
    image_size: int = Field(224, ge=16, le=2048)
    val_fraction: float = Field(0.2, gt=0.0, lt=0.9)
    positive_class: str = "good"
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto", description="DataLoader worker processes; auto: none on a CPU (workers take "
        "cores from the training threads), min(8, cores) with CUDA")
    max_pixels: int = Field(
        64_000_000, ge=1, description="refuse larger images (decompression-bomb guard)"
    )
    cache_dir: str | None = Field(
        None, description="decoded-image cache folder (decode once, memory-map after); None = off"
    )
    mean: tuple[float, float, float] | None = Field(
        None, description="normalisation mean; None = the model's pretrained config"
    )
    std: tuple[float, float, float] | None = None


class LabelsConfig(_Section):
    """Which targets a run learns. `binary` reads the `label` column, or derives good/poor from
    the Gardner `grade` column when `from_grade` is true; `multiclass` uses every label value as a
    class; `gardner` learns good/poor from the grade (as `from_grade`) plus three grade heads
    (expansion, ICM, TE; ICM/TE masked where not assessable) in one multi-task model."""

    task: Literal["binary", "multiclass", "gardner"] = "binary"
    column: str = "label"
    from_grade: bool = False
    grade_column: str = "grade"
    good_min_expansion: int = Field(3, ge=1, le=6)
    good_icm: list[Literal["A", "B", "C"]] = Field(default_factory=lambda: ["A", "B"])
    good_te: list[Literal["A", "B", "C"]] = Field(default_factory=lambda: ["A", "B"])


class AugmentConfig(_Section):
    """Training augmentation (albumentations). An embryo has no "up", so any-angle rotation and
    flips are label-preserving; the photometric terms cover microscope-to-microscope variation."""

    rotate_p: float = Field(0.7, ge=0.0, le=1.0, description="any-angle rotation probability")
    flip: bool = True
    rot90: bool = True
    scale: float = Field(0.1, ge=0.0, lt=1.0, description="max relative zoom in/out")
    shift: float = Field(0.05, ge=0.0, lt=0.5, description="max shift, fraction of the side")
    brightness: float = Field(0.15, ge=0.0, le=1.0)
    contrast: float = Field(0.15, ge=0.0, le=1.0)
    gamma: float = Field(0.15, ge=0.0, lt=1.0, description="max relative gamma change")
    blur_p: float = Field(0.15, ge=0.0, le=1.0, description="defocus/Gaussian blur probability")
    noise_p: float = Field(0.15, ge=0.0, le=1.0, description="sensor noise probability")


class TrainConfig(_Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    warmup_epochs: int = Field(0, ge=0)
    patience: int = Field(0, ge=0, description="early-stopping patience in epochs; 0 = off")
    augment: bool = True
    weighted_sampler: bool = Field(False, description="sample classes equally often")
    freeze_backbone_epochs: int = Field(0, ge=0, description="train only the head at first")
    head_lr: float | None = Field(None, gt=0.0, description="head learning rate; None = lr")
    scratch_lr: float | None = Field(
        None, gt=0.0, description="learning rate of every layer when no pretrained weights "
        "were loaded; None = head_lr, else lr (see embryo_ml.train.recipe)")
    adapt_to_weights: bool = Field(
        True, description="apply freeze_backbone_epochs and the lr/head_lr split only when "
        "pretrained weights were loaded; false = every setting as written")
    ema: bool = Field(False, description="evaluate and export an EMA of the weights")
    ema_decay: float = Field(
        0.998, gt=0.0, lt=1.0, description="the EMA's largest decay; warmed up from 0 and "
        "capped so the average spans at most a tenth of the run (embryo_ml.train.ema)")
    ema_warmup: bool = Field(
        True, description="warm the EMA decay up from 0 and cap it by the run length; false = "
        "the fixed ema_decay from the first step (the behaviour before the warm-up)")
    refit: bool = Field(
        False, description="after choosing the epoch count on the validation split, retrain "
        "on train + validation for that many epochs and export that model (calibration and "
        "the validation verdict stay those of the validation run)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch default")
    amp: Literal["auto", "off", "bf16", "fp16"] = Field(
        "auto", description="mixed precision: auto = bf16 (or fp16) on CUDA, bf16 on a CPU "
        "with native bf16 units (AMX, AVX512-BF16), else off"
    )
    channels_last: Literal["auto"] | bool = Field(
        "auto", description="NHWC memory format for convolutions: auto = true with CUDA"
    )
    select_metric: Literal["auto", "auc", "mean_subgroup_auc", "within_patient_auc"] = Field(
        "auto", description="validation metric that picks the best checkpoint (and early "
        "stopping): auc (overall), mean_subgroup_auc (mean within-group AUC of the column "
        "select_subgroup), within_patient_auc; auto = mean_subgroup_auc when the data has the "
        "select_subgroup column, else auc"
    )
    select_subgroup: str = Field(
        "day", min_length=1, description="the column of select_metric=mean_subgroup_auc"
    )
    select_within_se: bool = Field(
        True, description="keep the latest epoch within one standard error of the best "
        "validation score (the one-standard-error rule); false = the maximum")
    progressive_resize: float = Field(
        1.0, gt=0.0, le=1.0, description="train the first epoch at this fraction of "
        "data.image_size, growing linearly to the full size at 85% of the epochs; validation "
        "and the exported model always use the full size (embryo_ml.train.resolution); 1 = off")
    validate_warmup: bool = Field(
        False, description="also validate the learning-rate warm-up epochs, which are never "
        "chosen as the best (false saves one validation pass each; their history.csv row has "
        "no val_ columns)")
    learning_check_epoch: int = Field(
        2, ge=0, description="after this epoch (0-based), warn when the training loss has not "
        "fallen below the loss of a constant prediction; 0 = no check")

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        """YAML reads a bare `off` as false: `--set train.amp=off` means "off"."""
        return "off" if value is False else value


class LossConfig(_Section):
    class_weights: Literal["auto", "none"] | list[float] = Field(
        "none", description="auto = inverse class frequency on the training split"
    )
    focal_gamma: float = Field(0.0, ge=0.0, description="0 = cross-entropy; 2 = typical focal")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    grade_weight: float = Field(
        1.0, ge=0.0, description="labels.task=gardner: weight of each grade head's loss "
        "(expansion, ICM, TE) beside the good/poor head; 0 = train the main head only"
    )


class CalibrationConfig(_Section):
    """Fit on validation logits after training; stored in the bundle and applied when scoring."""

    method: Literal["temperature", "none"] = "temperature"
    threshold: Literal["youden", "sensitivity", "fixed"] = Field(
        "youden", description="youden: max sens+spec-1; sensitivity: reach target_sensitivity"
    )
    target_sensitivity: float = Field(0.9, gt=0.0, le=1.0)
    fixed_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    prior_column: str | None = Field(
        "day", min_length=1, description="two classes: fit a logit offset per value of this "
        "column beside the temperature (embryo_ml.evaluation.prior), applied when a scored "
        "manifest has the column; null = the image alone")


class EvalConfig(_Section):
    """Evaluation reported by `train`, `cv` and `evaluate` (see `embryo_ml.evaluation`)."""

    subgroups: list[str] = Field(
        default_factory=lambda: ["day", "clinic", "focal_plane"],
        description="manifest columns to report metrics for, per value (columns absent from "
        "the data are listed as absent); never patient or embryo ids",
    )
    min_group_size: int = Field(
        10, ge=1, description="a subgroup with fewer images is reported as too few, unscored"
    )
    n_boot: int = Field(
        1000, ge=0, description="bootstrap resamples of patients for 95% intervals; 0 = none"
    )
    cohort_by: list[str] = Field(
        default_factory=lambda: ["day"], description="columns that, with patient_id, make a "
        "cohort for the within-patient metrics (one patient's embryos of one day)",
    )
    shortcut_margin: float = Field(
        0.05, ge=0.0, le=1.0, description="warn when the model's AUC does not beat the AUC of "
        "a subgroup column alone by this much"
    )
    gate_within: list[str] = Field(
        default_factory=lambda: ["day"], description="columns whose mean within-group AUC "
        "must exclude 0.5 for the run to pass its validation check (where the data has them)")
    gate_min_per_class: int = Field(
        10, ge=1, description="fewer validation images of a class than this: the validation "
        "verdict is 'inconclusive'")

    @field_validator("subgroups")
    @classmethod
    def _no_identifiers(cls, columns: list[str]) -> list[str]:
        refused = [c for c in columns if c in ("patient_id", "embryo_id", "path")]
        if refused:
            raise ValueError(f"{refused[0]} cannot be a subgroup (identifiers would reach "
                             "MLflow; within-patient metrics are reported anyway)")
        if len(set(columns)) != len(columns):
            raise ValueError("a column is listed twice")
        return columns


class TrustConfig(_Section):
    """What a bundle knows about its own limits, fit at export on the run's images (see
    `embryo_ml.evaluation.ood` and `embryo_ml.evaluation.conformal`)."""

    ood_alpha: float = Field(
        0.01, gt=0.0, lt=0.5, description="out_of_distribution false-alarm rate on images like "
        "the validation ones: the flag limit is the conformal (1 - ood_alpha) quantile of the "
        "validation images' feature distance")
    ood_k: int = Field(1, ge=1, le=100, description="the k-th nearest training image sets the "
                       "feature-space distance")
    ood_reference_images: int = Field(
        2000, ge=10, description="training images (at most) whose features the bundle keeps as "
        "the reference")
    shift_p: float = Field(
        0.001, gt=0.0, lt=0.5, description="a scoring run warns of dataset shift when this few "
        "runs of images like the validation ones would be flagged as often (one-sided binomial)")
    conformal_alpha: float = Field(
        0.1, gt=0.0, lt=0.5, description="conformal 'uncertain' flag: each class's prediction "
        "sets miss its true images at most this often, on images like the validation ones")


class PretrainConfig(_Section):
    """Self-supervised pretraining (`embryo-ml pretrain`, `embryo_ml.train.pretrain`): SimSiam on
    the clinic's own unlabelled images; `model.*` and `data.*` are shared with training, so the
    backbone and input size pretrained are the ones `train` fine-tunes."""

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=4, description="images per step (two views each); SimSiam "
                            "needs no negatives, so small batches work")
    lr: float = Field(1e-3, gt=0.0, description="AdamW learning rate, cosine decay after "
                      "warm-up")
    weight_decay: float = Field(0.05, ge=0.0)
    warmup_epochs: int = Field(2, ge=0)
    projection_dim: int = Field(512, ge=16, description="projector output width")
    predictor_dim: int = Field(128, ge=8, description="predictor bottleneck width")
    min_crop: float = Field(0.5, gt=0.1, le=1.0, description="smallest crop side, as a share "
                            "of the image side; crops keep the detected embryo in view")
    blur_p: float = Field(0.3, ge=0.0, le=1.0, description="focus-blur probability per view "
                          "(mild, sigma up to 1.2 px at 128 px: grades live in fine detail)")
    brightness: float = Field(0.3, ge=0.0, le=1.0)
    contrast: float = Field(0.3, ge=0.0, le=1.0)
    noise_p: float = Field(0.2, ge=0.0, le=1.0)
    pair_p: float = Field(0.5, ge=0.0, le=1.0, description="where embryo_id is known, the "
                          "chance that the second view is another image of the same embryo")
    pair_window: int = Field(2, ge=1, description="that other image is at most this many "
                             "places away in the embryo's order (focal plane, else file name): "
                             "neighbouring planes and frames, not day 1 against day 5")
    probe: bool = Field(True, description="when the images have labels, fit a linear probe "
                        "on the frozen features at the end (grouped cross-validation)")


class TrackingConfig(_Section):
    tracking_uri: str | None = Field(
        None, description="MLflow URI; None = $MLFLOW_TRACKING_URI or sqlite:///mlflow.db"
    )
    experiment: str = "embryo-ml"
    log_checkpoint: bool = True


class Config(_Section):
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    labels: LabelsConfig = Field(default_factory=LabelsConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    trust: TrustConfig = Field(default_factory=TrustConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def flat(self) -> dict[str, Any]:
        """`{'train.lr': 0.001, ...}`: the form MLflow params and `--set` use."""
        return _flatten(self.model_dump(mode="json"))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _valid_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_valid_keys(annotation, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=3e-4` -> (['train', 'lr'], 0.0003); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. train.epochs=5")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = read_yaml(raw) if raw.strip() else None
    except ConfigError:  # not YAML (e.g. `a: b: c`, a date like 2024-13-01): the text itself
        value = raw
    return key.split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict; unknown keys are caught by validation afterwards."""
    for text in overrides:
        parts, value = parse_override(text)
        node = tree
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return tree


def _explain(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key, _valid_keys(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{source}: unknown config key '{key}'{hint}"
    got = repr(first.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."
    return f"{source}: invalid value for '{key}': {first['msg']} (got {got})"


def config_from_dict(tree: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_explain(error, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe (defaults when `path` is None), apply `--set` overrides, validate."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = read_yaml(read_config_text(path), path)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        tree = loaded or {}
    if overrides:
        tree = apply_overrides(tree, overrides)
        source += " + --set"
    return config_from_dict(tree, source)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config (every default filled in) so a run can be repeated exactly."""
    atomic_write_text(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
