"""`embryo-ml` command line. Thin: parse, call one library function, print the outcome.

Heavy modules are imported inside each subcommand, so `embryo-ml score` never loads torch or
mlflow. Every user-caused problem ends as one line on stderr and exit status 2 (`main`);
`--debug` or EMBRYO_ML_DEBUG=1 shows its traceback too.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import NoReturn

from embryo_ml.errors import EmbryoMLError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
DEBUG_ENV = "EMBRYO_ML_DEBUG"  # =1: tracebacks for user errors too, as --debug


def _cmd_synth(args: argparse.Namespace) -> int:
    from embryo_ml.data.synthetic import generate_dataset

    manifest = generate_dataset(args.out, n=args.n, size=args.size, seed=args.seed,
                                focal_planes=args.focal_planes, progress=not args.quiet)
    print(f"wrote {args.n} images and {manifest}")
    return 0


def _resumed_data(run_dir: Path) -> str:
    """The data an interrupted run trained on, as its run.json records it."""
    import json

    try:
        record = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except ValueError as error:  # not JSON, not UTF-8
        raise EmbryoMLError(f"--resume {run_dir}: run.json is damaged ({error}); pass the "
                            "training data with --data") from None
    data = record.get("data") if isinstance(record, dict) else None
    if not isinstance(data, str) or not data:
        raise EmbryoMLError(f"--resume {run_dir}: run.json names no training data; pass it "
                            "with --data")
    return data


def _cmd_train(args: argparse.Namespace) -> int:
    from embryo_ml.config import load_config

    data = args.data
    if args.resume:
        # The run's own resolved config and data; --set may still change e.g. train.epochs.
        run_dir = args.resume
        if not (run_dir / "last.pt").is_file() or not (run_dir / "run.json").is_file():
            raise EmbryoMLError(f"--resume {run_dir}: not an interrupted training run "
                                "(no last.pt / run.json)")
        cfg = load_config(run_dir / "config.yaml", args.set)
        data = data or _resumed_data(run_dir)
    else:
        cfg = load_config(args.config, args.set)  # fails here, before any import of torch
        if args.out is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise EmbryoMLError("under torchrun, pass --out RUN_DIR (every process must write "
                                "to the same run folder)")
        run_dir = args.out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    from embryo_ml.train.fit import fit, print_verdict

    result = fit(cfg, data, run_dir, progress=not args.quiet, resume=bool(args.resume))
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # DDP: rank 0 reports
    metrics = result.metrics
    print(f"validation ROC AUC {metrics['val_auc']:.4f} "
          f"(best epoch {metrics['best_epoch']}, {metrics['n_val']} images)")
    within = {k: v for k, v in metrics.items()
              if k.startswith("val_within_") and isinstance(v, float)}
    if within:  # the numbers that matter for choosing among one patient's embryos (README)
        print("  " + ", ".join(f"{k.removeprefix('val_').replace('_', ' ')} {v:.4f}"
                               for k, v in within.items()))
    for warning in metrics.get("shortcut_warnings") or []:
        print(f"  WARNING: {warning.removeprefix('WARNING: ')}")
    print_verdict(metrics)
    print(f"run folder: {result.run_dir}")
    print(f"MLflow run id: {result.run_id}")
    if args.register:
        _register_trained(result.run_dir, result.run_id, result.tracking_uri, args.register)
    return 0


def _warn(text: str | None) -> None:
    """One `warning:` line on stderr, the counterpart of the `error:` lines of `main`."""
    if text:
        print(f"warning: {text}", file=sys.stderr)


def _warn_about_bundle(folder: Path) -> None:
    """Warn once when the bundle's model did not pass its validation check."""
    from embryo_ml.export.bundle import read_bundle, validation_warning

    _warn(validation_warning(read_bundle(folder, verify=False)))  # verified by the command


def _register_trained(run_dir: Path, run_id: str, tracking_uri: str, name: str) -> None:
    """`train --register`: what gets registered is always the scorable model, so the run's
    best checkpoint is exported (RUN/bundle, parity-checked) and logged as the pyfunc model.
    A run that failed its validation check is refused first; its folder stays as it is."""
    from embryo_ml.export.gate import check_registrable, export_warning, run_validation

    validation = run_validation(run_dir)
    check_registrable(validation, run_dir)
    from embryo_ml.export.onnx_export import export_bundle
    from embryo_ml.serving.pyfunc import log_bundle_model

    bundle = export_bundle(run_dir, run_dir / "bundle")
    _warn(export_warning(validation, run_dir))
    logged = log_bundle_model(bundle.path, run_id=run_id, registered_name=name,
                              tracking_uri=tracking_uri)
    print(f"bundle: {bundle.path}")
    print(f"registered model {name!r} version {logged.version}, alias {logged.alias!r} "
          f"(models:/{name}@{logged.alias})")


def _cmd_cv(args: argparse.Namespace) -> int:
    from embryo_ml.config import load_config

    cfg = load_config(args.config, args.set)
    data = args.data or cfg.data.manifest
    if data is None:
        raise EmbryoMLError("no data: pass --data or set data.manifest")
    from embryo_ml.train.cv import cross_validate, format_summary

    out = args.out or Path("runs") / ("cv-" + datetime.now().strftime("%Y%m%d-%H%M%S"))
    result = cross_validate(cfg, data, args.folds, out, args.splits, progress=not args.quiet)
    print(format_summary(result.summary, result.evaluation))
    print(f"out-of-fold predictions: {out / 'oof_predictions.csv'}")
    print(f"MLflow parent run id: {result.parent_run_id}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from embryo_ml.config import load_config

    cfg = load_config(args.config, args.set)
    from embryo_ml.evaluation.scores import evaluate_scores, format_counts

    result = evaluate_scores(args.scores, args.labels, args.out, cfg, images=args.images,
                             train_labels=args.train_labels)
    print(format_counts(result.counts))
    for note in result.notes:
        print(f"note: {note}")
    print(result.evaluation.format())
    print(f"wrote {len(result.files)} files to {result.out_dir} (metrics.json, "
          "subgroup_metrics.csv, plots)")
    return 0


def _cmd_augment_preview(args: argparse.Namespace) -> int:
    from embryo_ml.config import load_config

    cfg = load_config(args.config, args.set)
    from embryo_ml.report.preview import augment_preview

    out = augment_preview(cfg, args.data, args.out, args.images, args.draws)
    print(f"wrote {out}: each row one image, the original first, then {args.draws} "
          "training augmentations")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from embryo_ml.export.gate import (
        check_exportable,
        check_registrable,
        export_warning,
        run_validation,
    )

    validation = run_validation(args.run_dir)  # the quality gate first: before any other work
    if args.register is not None:
        check_registrable(validation, args.run_dir)
    check_exportable(validation, args.run_dir, args.allow_failed_validation)
    signing_key = None
    if args.sign is not None:  # a bad key file fails now, not after the export
        from embryo_ml.export.signing import load_private_key

        signing_key = load_private_key(args.sign)
    log_model = args.log_model or args.register is not None
    uri = None
    if log_model:
        from embryo_ml.config import load_config
        from embryo_ml.train.tracking import check_reachable, resolve_tracking_uri

        # Default: the store the run was trained against (where the bundle's run id lives).
        run_config = args.run_dir / "config.yaml"
        trained_uri = None
        if run_config.is_file():
            trained_uri = load_config(run_config).tracking.tracking_uri
        uri = resolve_tracking_uri(args.tracking_uri or trained_uri)
        check_reachable(uri)  # before the export, not after it
    from embryo_ml.export.onnx_export import export_bundle

    bundle = export_bundle(args.run_dir, args.out, int8=not args.no_int8,
                           allow_failed_validation=args.allow_failed_validation)
    _warn(export_warning(validation, args.run_dir))
    print(f"wrote bundle {bundle.path} ({bundle.architecture}, {bundle.input_size}px, "
          f"sha256 {bundle.sha256[:12]}..., ONNX/PyTorch max diff "
          f"{bundle.val_metrics['parity_max_abs_diff']:.1e})")
    if bundle.int8:
        print(f"int8 model for fast CPU scoring: max probability difference to fp32 "
              f"{bundle.int8['max_abs_diff']:.4f} on {bundle.int8['parity_images']} validation "
              f"images (tolerance {bundle.int8['tolerance']})")
    if signing_key is not None:  # before logging, so the logged bundle carries its signature
        from embryo_ml.export.signing import key_id, sign_bundle

        signature = sign_bundle(bundle.path, signing_key)
        print(f"signed with key {key_id(signing_key.public_key())} -> {signature}")
    if log_model:
        from embryo_ml.serving.pyfunc import log_bundle_model

        logged = log_bundle_model(bundle.path, registered_name=args.register, tracking_uri=uri)
        print(f"logged MLflow model {logged.model_uri} (run {logged.run_id}, store {uri})")
        if logged.version is not None:
            print(f"registered model {logged.registered_name!r} version {logged.version}, "
                  f"alias {logged.alias!r} -> version {logged.version} "
                  f"(models:/{logged.registered_name}@{logged.alias})")
    return 0


def _check_trusted(bundle: Path, keys: list[Path]) -> None:
    """`--trusted-key`: refuse, before any work, a bundle not signed by one of `keys`."""
    if not keys:
        return
    from embryo_ml.export.signing import verify_bundle

    _, signer = verify_bundle(bundle, keys)
    print(f"bundle signed by trusted key {signer.key_id} ({signer.source.name})")


def _cmd_score(args: argparse.Namespace) -> int:
    from embryo_ml.score.scorer import ScoringInterrupted, score_images
    from embryo_ml.score.shift import shift_warning

    if args.report is not None and args.report.is_dir():  # before the work, not after it
        raise EmbryoMLError(f"--report {args.report} is a folder; give an .html file name")
    _check_trusted(args.bundle, args.trusted_key)
    try:
        summary = score_images(args.images, args.bundle, args.out, batch_size=args.batch_size,
                               workers=args.workers, threads=args.threads,
                               progress=not args.quiet, max_pixels=args.max_pixels,
                               resume=args.resume, tta=args.tta, aggregate=args.aggregate,
                               embryo_pattern=args.embryo_pattern, precision=args.precision)
    except ScoringInterrupted as stop:
        kept = stop.summary.n_images + stop.summary.n_resumed
        print(f"stopped: {kept} row(s) kept in {stop.summary.out}; run the same command with "
              "--resume to score the rest", file=sys.stderr)
        raise
    resumed = f", {summary.n_resumed} already there" if summary.n_resumed else ""
    print(f"scored {summary.n_scored} of {summary.n_images} images{resumed} in "
          f"{summary.seconds:.1f}s ({summary.images_per_second:.0f} images/s, "
          f"{summary.precision} model) -> {summary.out}")
    print(f"{summary.n_embryos} embryo(s) -> {summary.embryos_out}")
    if summary.n_failed:
        print(f"{summary.n_failed} image(s) could not be scored (see the 'status' column):")
        for path, status in summary.failures[:10]:
            print(f"  {path}: {status}")
        if summary.n_failed > 10:
            print(f"  ... and {summary.n_failed - 10} more")
    _warn(summary.validation_warning)  # beside the results it qualifies
    _warn(shift_warning(summary.shift))  # `warning: dataset shift: ...` for a shifted run
    if args.report is not None:
        _write_report(args, summary.out, args.images)
    return 0


def _write_report(args: argparse.Namespace, scores: Path, images: Path | None) -> None:
    from embryo_ml.report.html import write_report

    out = write_report(scores, args.bundle, args.report, images=images,
                       heatmaps=not args.no_heatmaps, max_thumbnails=args.max_thumbnails,
                       threads=args.threads, progress=not args.quiet)
    print(f"report -> {out}")


def _cmd_report(args: argparse.Namespace) -> int:
    _check_trusted(args.bundle, args.trusted_key)
    _write_report(args, args.scores, args.images)
    _warn_about_bundle(args.bundle)  # after the work: an error stays the only line
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    from embryo_ml.export.signing import generate_key_pair

    private, public, key = generate_key_pair(args.out)
    print(f"key {key}: private key {private} (keep it with whoever exports bundles; never "
          f"send it), public key {public} (give it to every place that scores, for "
          "--trusted-key)")
    return 0


def _cmd_sign(args: argparse.Namespace) -> int:
    from embryo_ml.export.signing import key_id, load_private_key, sign_bundle

    key = load_private_key(args.key)
    signature = sign_bundle(args.bundle, key)
    print(f"signed bundle {args.bundle} with key {key_id(key.public_key())} -> {signature}")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from embryo_ml.score.explain import explain_image

    result = explain_image(args.image, args.bundle, args.out, class_name=args.class_name,
                           threads=args.threads)
    print(f"score {result.score:.4f} (calibrated probability of {result.positive_class!r}); "
          f"heatmap of the evidence for {result.class_name!r}")
    print(f"wrote {args.out} (left: the image, right: the heatmap over it)")
    return 0


def _output_file(path: Path, option: str) -> Path:
    """Before any work: `path` is not a folder and its folder exists, created when missing (as
    score, report and explain do for theirs); an impossible one is a one-line error."""
    if path.is_dir():
        raise EmbryoMLError(f"{option} {path} is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise EmbryoMLError(f"{option} {path}: cannot create the folder {path.parent} "
                            f"({error.strerror or error})") from None
    return path


def _cmd_data_manifest(args: argparse.Namespace) -> int:
    from embryo_ml.data.manifest import build_manifest, write_manifest

    _output_file(args.out, "--out")
    table = build_manifest(args.source, args.pattern, out=args.out,
                           label_from_folder=True if args.label_from_folder else None,
                           allow_unmatched=args.allow_unmatched)
    write_manifest(table, args.out)
    columns = ", ".join(c for c in table.columns if c != "path")
    print(f"wrote {args.out}: {len(table)} images; columns: {columns or '(path only)'}")
    return 0


def _cmd_data_split(args: argparse.Namespace) -> int:
    from embryo_ml.data.manifest import load_labelled, write_manifest
    from embryo_ml.data.splits import make_splits

    _output_file(args.out, "--out")
    table = load_labelled(args.manifest)
    splits = make_splits(table, folds=args.folds, test_fraction=args.test_fraction,
                         seed=args.seed)
    base = args.out.resolve().parent
    splits["path"] = [os.path.relpath(p, base).replace(os.sep, "/") for p in splits["path"]]
    write_manifest(splits, args.out)
    sizes = splits.groupby(["split", "fold"]).size()
    print(f"wrote {args.out}: " + ", ".join(
        ("test" if split == "test" else f"fold {fold}") + f" {n}"
        for (split, fold), n in sizes.items()))
    print("verified: no group in two folds or in both train and test")
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    import json

    from embryo_ml.data.check import check_data, format_report
    from embryo_ml.data.manifest import load_table, read_manifest
    from embryo_ml.data.splits import split_parts
    from embryo_ml.fileio import atomic_write_text

    if args.json:
        _output_file(args.json, "--json")  # before the check, not after it
    table = load_table(args.data)
    splits = None
    if args.splits:
        splits = read_manifest(args.splits)
        splits = splits.assign(split=split_parts(splits))
    report = check_data(table, splits, near_threshold=args.near_threshold,
                        progress=not args.quiet)
    print(format_report(report))
    if args.json:
        atomic_write_text(args.json, json.dumps(report.to_json(), indent=2))
        print(f"wrote {args.json}")
    return 0 if report.ok(allow=args.allow) else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from embryo_ml.demo import run_demo

    run_demo(args.out, config=args.config, progress=not args.quiet)
    return 0


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.epochs=5 (repeatable)")


def _whole(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {minimum} or more, got {value}")
    return value


def _count(text: str) -> int:
    return _whole(text, 0)


def _positive(text: str) -> int:
    return _whole(text, 1)


def _add_trusted_key(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trusted-key", type=Path, action="append", default=[], metavar="PUB",
                        help="refuse a bundle that is not signed by this public key (a PEM "
                        "file, or a folder of *.pub/*.pem keys; repeatable)")


def _add_report_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-heatmaps", action="store_true",
                        help="report without heatmaps (they cost extra model runs)")
    parser.add_argument("--max-thumbnails", type=_count, default=1000, metavar="N",
                        help="embed pictures for at most N images in the report (default 1000)")


class _Parser(argparse.ArgumentParser):
    """argparse, with a mistake on the command line reported as the house's one `error:` line
    and exit status 2 (not the usage block; `--help` shows that). Subcommands inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _version() -> str:
    """The installed package's version (importlib.metadata), or the source tree's where the
    package is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("embryo-ml")
    except PackageNotFoundError:
        from embryo_ml import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="embryo-ml", description="Train, export and run IVF embryo image classifiers."
    )
    parser.add_argument("--version", action="version", version=f"embryo-ml {_version()}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback behind an error (also: {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic embryo data set with a manifest")
    p.add_argument("out", type=Path)
    p.add_argument("--n", type=_positive, default=1000, help="number of images")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (64-256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--focal-planes", type=_positive, default=1, help="images per embryo")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("train", help="train a model; tracked in MLflow")
    p.add_argument("--config", type=Path, help="YAML recipe (e.g. configs/demo.yaml)")
    p.add_argument("--data", type=Path, help="manifest CSV or folder-per-class tree")
    p.add_argument("--out", type=Path, help="run folder (default runs/<timestamp>)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue an interrupted run from its last.pt (same MLflow run)")
    p.add_argument("--register", metavar="NAME",
                   help="after training, export the bundle, log it as an MLflow model and "
                   "register it under NAME with alias 'candidate'")
    _add_overrides(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("cv", help="grouped k-fold cross-validation (MLflow parent + fold runs)")
    p.add_argument("--config", type=Path)
    p.add_argument("--data", type=Path, help="manifest CSV or folder-per-class tree")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--splits", type=Path, help="splits.csv from `data split` (its folds)")
    p.add_argument("--out", type=Path, help="folder (default runs/cv-<timestamp>)")
    _add_overrides(p)
    p.set_defaults(func=_cmd_cv)

    p = sub.add_parser("evaluate", help="metrics, subgroups, shortcut baselines and plots of a "
                       "scored set with known labels")
    p.add_argument("scores", type=Path, help="scores file from `score` (.csv/.jsonl/.parquet)")
    p.add_argument("--labels", type=Path, required=True,
                   help="manifest CSV with the labels (and subgroup columns, patient_id, grade)")
    p.add_argument("--out", type=Path, required=True,
                   help="folder for metrics.json, subgroup_metrics.csv and the PNG plots")
    p.add_argument("--config", type=Path, help="YAML recipe: eval.*, data.positive_class, labels.*")
    p.add_argument("--images", type=Path, default=None,
                   help="the folder (or manifest CSV) that was scored: score paths are relative "
                   "to it (default: the scores file's folder)")
    p.add_argument("--train-labels", type=Path, default=None, metavar="MANIFEST",
                   help="the training manifest: fit the shortcut baselines on it (default: on "
                   "the evaluated rows themselves)")
    _add_overrides(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("augment-preview", help="grid of training augmentations (PNG)")
    p.add_argument("config", type=Path)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("augment_preview.png"))
    p.add_argument("--images", type=_positive, default=6)
    p.add_argument("--draws", type=_positive, default=7)
    _add_overrides(p)
    p.set_defaults(func=_cmd_augment_preview)

    p = sub.add_parser("export", help="export a run's best checkpoint as a scoring bundle")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    p.add_argument("--log-model", action="store_true",
                   help="also log the bundle as an MLflow pyfunc model (into the training run)")
    p.add_argument("--register", metavar="NAME",
                   help="log and register the model as NAME; alias 'candidate' -> new version")
    p.add_argument("--tracking-uri", help="MLflow store (default: the run's tracking.tracking_uri"
                   ", else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--no-int8", action="store_true",
                   help="do not build the int8 model (by default it is built and kept when it "
                   "agrees with fp32 within 0.02 on the validation images)")
    p.add_argument("--allow-failed-validation", action="store_true",
                   help="export a run that failed its validation check, for inspection only: "
                   "bundle.json records it, score and the report warn on every use, and it "
                   "can never be registered")
    p.add_argument("--sign", type=Path, metavar="KEY",
                   help="sign the bundle with this Ed25519 private key (PEM, from `embryo-ml "
                   "keygen`): writes bundle.sig, checked by score/report --trusted-key")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("keygen", help="make an Ed25519 key pair for signing bundles")
    p.add_argument("--out", type=Path, required=True, metavar="PREFIX",
                   help="writes PREFIX.key (private, owner-only) and PREFIX.pub (public); "
                   "encrypted when $EMBRYO_ML_KEY_PASSPHRASE is set")
    p.set_defaults(func=_cmd_keygen)

    p = sub.add_parser("sign", help="sign an existing bundle (e.g. with a new key)")
    p.add_argument("bundle", type=Path)
    p.add_argument("--key", type=Path, required=True, help="Ed25519 private key (PEM)")
    p.set_defaults(func=_cmd_sign)

    p = sub.add_parser("score", help="score a folder (recursive) or a manifest CSV of images")
    p.add_argument("images", type=Path)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("scores.csv"),
                   help="per-image scores; format by extension: .csv, .jsonl or .parquet. "
                   "Per-embryo results go beside it: scores.csv -> scores.embryos.csv")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows already in --out and score only the images not in it")
    p.add_argument("--tta", action="store_true",
                   help="average the logits over the 8 flips/90-degree rotations")
    p.add_argument("--aggregate", choices=["mean", "max"], default="mean",
                   help="embryo score from its images' scores (default: mean)")
    p.add_argument("--embryo-pattern", metavar="REGEX",
                   help="regex searched in each image's path, named group embryo_id and "
                   "optionally patient_id, e.g. '(?P<embryo_id>\\d+)_(?P<focal_plane>-?\\d+)'")
    p.add_argument("--batch-size", type=_positive, default=32)
    p.add_argument("--workers", type=_positive, default=None, help="decoding threads")
    p.add_argument("--threads", type=_count, default=None,
                   help="ONNX Runtime intra-op threads (0 = one per core)")
    p.add_argument("--precision", choices=["auto", "fp32", "int8"], default="auto",
                   help="model to score with: auto = the bundle's int8 model when it has one "
                   "(2-3x faster on CPU, checked against fp32 at export), else fp32")
    p.add_argument("--max-pixels", type=_positive, default=64_000_000,
                   help="refuse images with more pixels (decompression-bomb guard)")
    p.add_argument("--report", type=Path, metavar="HTML",
                   help="also write the HTML report (one self-contained file) when done")
    _add_trusted_key(p)
    _add_report_options(p)
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser("explain", help="heatmap of what the model looked at, for one image (PNG)")
    p.add_argument("image", type=Path)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("overlay.png"),
                   help="PNG: the image and its heatmap overlay side by side")
    p.add_argument("--class", dest="class_name", metavar="NAME",
                   help="show the evidence for this class (default: the predicted class)")
    p.add_argument("--threads", type=_count, default=None,
                   help="ONNX Runtime intra-op threads (0 = one per core)")
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser("report", help="HTML report of a scores file (self-contained, offline)")
    p.add_argument("scores", type=Path, help="scores file from `score` (.csv/.jsonl/.parquet)")
    p.add_argument("--bundle", type=Path, required=True, help="the bundle that scored it")
    p.add_argument("--out", dest="report", type=Path, default=Path("report.html"),
                   metavar="HTML", help="the report to write (default: report.html)")
    p.add_argument("--images", type=Path, default=None,
                   help="the folder (or manifest CSV) that was scored: image paths in the "
                   "scores are relative to it (default: the scores file's folder)")
    p.add_argument("--threads", type=_count, default=None,
                   help="ONNX Runtime intra-op threads (0 = one per core)")
    _add_trusted_key(p)
    _add_report_options(p)
    p.set_defaults(func=_cmd_report)

    data = sub.add_parser("data", help="build manifests, split, check a data set")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = data_sub.add_parser("manifest", help="manifest CSV from a folder (regex on paths) or CSV")
    p.add_argument("source", type=Path, help="image folder or manifest CSV")
    p.add_argument("--pattern", help="regex searched in each relative path; named groups "
                   "become columns, e.g. '(?P<embryo_id>\\d+)_(?P<focal_plane>-?\\d+)_"
                   "(?P<grade>[^.]+)'")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--label-from-folder", action="store_true",
                   help="label = top-level folder name (default only without --pattern)")
    p.add_argument("--allow-unmatched", action="store_true",
                   help="keep paths the pattern does not match (empty columns)")
    p.set_defaults(func=_cmd_data_manifest)

    p = data_sub.add_parser("split", help="grouped, stratified test split + k folds")
    p.add_argument("manifest", type=Path)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("splits.csv"))
    p.set_defaults(func=_cmd_data_split)

    p = data_sub.add_parser("check", help="counts, duplicates, unreadable files, leakage")
    p.add_argument("data", type=Path, help="manifest CSV or folder-per-class tree")
    p.add_argument("--splits", type=Path, help="splits.csv to check for leakage")
    p.add_argument("--json", type=Path, help="also write the report as JSON")
    p.add_argument("--near-threshold", type=_count, default=4,
                   help="max differing bits of the perceptual hash for a near-duplicate")
    p.add_argument("--allow", action="store_true",
                   help="exit 0 even with unreadable files or leakage")
    p.set_defaults(func=_cmd_data_check)

    p = sub.add_parser("demo", help="synth -> train -> export -> score on built-in data")
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--config", type=Path, default=None, help="default: configs/demo.yaml")
    p.set_defaults(func=_cmd_demo)
    return parser


def _error_line(error: BaseException) -> str:
    """One line for a user's problem: the message of an `EmbryoMLError` (lines joined), or for
    a file-system error (`OSError`: a missing or read-only folder, a full disk, no permission)
    what the system said and the file(s), `No such file or directory (out/x.csv)`."""
    if isinstance(error, OSError) and error.strerror:
        files = [os.fsdecode(f) for f in (error.filename, error.filename2) if f is not None]
        text = error.strerror + (f" ({', '.join(files)})" if files else "")
    else:
        text = str(error) or error.__class__.__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _debug_requested(args: argparse.Namespace) -> bool:
    return bool(args.debug) or os.environ.get(DEBUG_ENV, "").strip().lower() in (
        "1", "true", "yes", "on")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. A user's problem (`EmbryoMLError`, raised where user input is read, and
    any `OSError` from the file system) ends as one `error:` line on stderr and exit status 2;
    `--debug` or EMBRYO_ML_DEBUG=1 prints its traceback first. Anything else is a bug and keeps
    its traceback (exit status 1)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("embryo_ml").setLevel(logging.INFO)
    try:
        return args.func(args)
    except (EmbryoMLError, OSError) as error:
        if _debug_requested(args):
            traceback.print_exc()
        print(f"error: {_error_line(error)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted: rows and checkpoints finished so far are kept", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
