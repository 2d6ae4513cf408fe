"""The bundle commands: `export` (a run's best checkpoint -> a scoring bundle, optionally logged
and registered in MLflow and signed), `keygen` and `sign` (Ed25519 bundle signatures)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from embryo_ml.cli.common import warn

if TYPE_CHECKING:
    from embryo_ml.export.bundle import Bundle


def add_export(parser: argparse.ArgumentParser) -> None:
    from embryo_ml.export.quantize import INT8_TOLERANCE

    parser.add_argument("run_dir", type=Path,
                        help="training run folder (from `train`) whose best checkpoint to export")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    parser.add_argument("--log-model", action="store_true",
                        help="also log the bundle as an MLflow pyfunc model (into the training "
                        "run)")
    parser.add_argument("--register", metavar="NAME",
                        help="log and register the model as NAME; alias 'candidate' -> new "
                        "version")
    parser.add_argument("--tracking-uri",
                        help="MLflow store (default: the run's tracking.tracking_uri, else "
                        "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    parser.add_argument("--no-int8", action="store_true",
                        help="do not build the int8 model (by default it is built and kept when "
                        f"it agrees with fp32 within {INT8_TOLERANCE} on the validation images)")
    parser.add_argument("--allow-failed-validation", action="store_true",
                        help="export a run that failed its validation check, for inspection "
                        "only: bundle.json records it, score and the report warn on every use, "
                        "and it can never be registered")
    parser.add_argument("--sign", type=Path, metavar="KEY",
                        help="sign the bundle with this Ed25519 private key (PEM, from "
                        "`embryo-ml keygen`): writes bundle.sig, checked by score/report "
                        "--trusted-key")
    parser.set_defaults(func=run_export)


def _tracking_store(run_dir: Path, tracking_uri: str | None) -> str:
    """Where `export --log-model` logs: by default the store the run was trained against (where
    the bundle's run id lives); checked reachable before the export, not after it."""
    from embryo_ml.config import load_config
    from embryo_ml.train.run_folder import CONFIG_FILE
    from embryo_ml.train.tracking import check_reachable, resolve_tracking_uri

    run_config = run_dir / CONFIG_FILE
    trained_uri = None
    if run_config.is_file():
        trained_uri = load_config(run_config).tracking.tracking_uri
    uri = resolve_tracking_uri(tracking_uri or trained_uri)
    check_reachable(uri)
    return uri


def _print_export(bundle: Bundle) -> None:
    print(f"wrote bundle {bundle.path} ({bundle.architecture}, {bundle.input_size}px, "
          f"sha256 {bundle.sha256[:12]}..., ONNX/PyTorch max diff "
          f"{bundle.val_metrics['parity_max_abs_diff']:.1e})")
    if bundle.int8:
        print(f"int8 model for fast CPU scoring: max probability difference to fp32 "
              f"{bundle.int8['max_abs_diff']:.4f} on {bundle.int8['parity_images']} validation "
              f"images (tolerance {bundle.int8['tolerance']})")


def _log_exported(bundle_path: Path, registered_name: str | None, uri: str | None) -> None:
    from embryo_ml.serving.pyfunc import log_bundle_model

    logged = log_bundle_model(bundle_path, registered_name=registered_name, tracking_uri=uri)
    print(f"logged MLflow model {logged.model_uri} (run {logged.run_id}, store {uri})")
    if logged.version is not None:
        print(f"registered model {logged.registered_name!r} version {logged.version}, "
              f"alias {logged.alias!r} -> version {logged.version} "
              f"(models:/{logged.registered_name}@{logged.alias})")


def run_export(args: argparse.Namespace) -> int:
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
    uri = _tracking_store(args.run_dir, args.tracking_uri) if log_model else None
    from embryo_ml.export.onnx_export import export_bundle

    bundle = export_bundle(args.run_dir, args.out, int8=not args.no_int8,
                           allow_failed_validation=args.allow_failed_validation)
    warn(export_warning(validation, args.run_dir))
    _print_export(bundle)
    if signing_key is not None:  # before logging, so the logged bundle carries its signature
        from embryo_ml.export.signing import key_id, sign_bundle

        signature = sign_bundle(bundle.path, signing_key)
        print(f"signed with key {key_id(signing_key.public_key())} -> {signature}")
    if log_model:
        _log_exported(bundle.path, args.register, uri)
    return 0


def add_keygen(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, metavar="PREFIX",
                        help="writes PREFIX.key (private, owner-only) and PREFIX.pub (public); "
                        "encrypted when $EMBRYO_ML_KEY_PASSPHRASE is set")
    parser.set_defaults(func=run_keygen)


def run_keygen(args: argparse.Namespace) -> int:
    from embryo_ml.export.signing import generate_key_pair

    private, public, key = generate_key_pair(args.out)
    print(f"key {key}: private key {private} (keep it with whoever exports bundles; never "
          f"send it), public key {public} (give it to every place that scores, for "
          "--trusted-key)")
    return 0


def add_sign(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, help="bundle folder to sign (writes bundle.sig)")
    parser.add_argument("--key", type=Path, required=True, help="Ed25519 private key (PEM)")
    parser.set_defaults(func=run_sign)


def run_sign(args: argparse.Namespace) -> int:
    from embryo_ml.export.signing import key_id, load_private_key, sign_bundle

    key = load_private_key(args.key)
    signature = sign_bundle(args.bundle, key)
    print(f"signed bundle {args.bundle} with key {key_id(key.public_key())} -> {signature}")
    return 0
