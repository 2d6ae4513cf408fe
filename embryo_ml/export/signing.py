"""Optional Ed25519 signatures of scoring bundles: who exported a bundle, checked where it scores.

A bundle's identity (`bundle_sha256` in bundle.json, `embryo_ml.export.bundle.bundle_identity`)
covers bundle.json and, through the SHA-256 it lists for each, every file the bundle names. It
makes any change visible, but anyone can write a new bundle with a new identity. A signature
says who wrote it: `embryo-ml export --sign KEY` (or `embryo-ml sign BUNDLE --key KEY`) writes
`bundle.sig` beside bundle.json, an Ed25519 signature of the identity by the ML team's private
key; `embryo-ml score|report --trusted-key PUB` then refuses, in one line, a bundle that is
unsigned, signed by a key that is not trusted, or changed since it was signed.

`bundle.sig` is JSON: {"format": SIGNATURE_FORMAT, "algorithm": "ed25519", "bundle_sha256": the
identity signed, "key_id": `key_id` of the signer, "signature": base64}. The signed message is
`MESSAGE_PREFIX` + the identity (ASCII), so a bundle signature cannot stand for anything else.
A check always verifies the signature against the identity the bundle has now (recomputed from
its files by `read_bundle`), never against the one the file records.

Keys are PEM files as `embryo-ml keygen --out PREFIX` or OpenSSL writes them
(`openssl genpkey -algorithm ed25519 -out team.key`,
`openssl pkey -in team.key -pubout -out team.pub`): the private key PKCS#8 (encrypted ones take
their passphrase from $EMBRYO_ML_KEY_PASSPHRASE), the public key SubjectPublicKeyInfo. A
trusted-key argument is one public key file or a folder of them (`*.pub`, `*.pem`): during a key
rotation it holds both the old and the new key.

Torch-free (the scoring path uses it); `cryptography` is imported only when a key is used.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embryo_ml.errors import BundleError, ConfigError
from embryo_ml.export.bundle import SIGNATURE_FILE, Bundle, identity, read_bundle
from embryo_ml.fileio import atomic_path, atomic_write_text

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

SIGNATURE_FORMAT = "embryo-ml-bundle-signature/1"
ALGORITHM = "ed25519"
MESSAGE_PREFIX = b"embryo-ml bundle identity v1\n"
PASSPHRASE_ENV = "EMBRYO_ML_KEY_PASSPHRASE"
PUBLIC_KEY_SUFFIXES = (".pub", ".pem")


@dataclass(frozen=True)
class TrustedKey:
    """A public key a clinic trusts, and the file it came from (for messages)."""

    key: Ed25519PublicKey
    source: Path

    @property
    def key_id(self) -> str:
        return key_id(self.key)


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short, stable name of a public key: the first 16 hex digits of the SHA-256 of its raw
    32 bytes (what `embryo-ml keygen` prints and `bundle.sig` records)."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _message(bundle_sha256: str) -> bytes:
    return MESSAGE_PREFIX + bundle_sha256.encode("ascii")


def _passphrase() -> bytes | None:
    value = os.environ.get(PASSPHRASE_ENV)
    return value.encode("utf-8") if value else None


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """The Ed25519 private key in a PEM file; ConfigError (one line) for anything else."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"signing key {path}: cannot be read ({error.strerror})") from None
    try:
        key = serialization.load_pem_private_key(data, password=_passphrase())
    except TypeError:  # encrypted without a passphrase, or a passphrase for a plain key
        raise ConfigError(f"signing key {path}: encrypted keys need their passphrase in "
                          f"${PASSPHRASE_ENV} (and plain keys none)") from None
    except ValueError:
        raise ConfigError(f"signing key {path}: not a PEM private key (or a wrong passphrase "
                          f"in ${PASSPHRASE_ENV})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"signing key {path}: an Ed25519 key is needed, this is a "
                          f"{type(key).__name__}")
    return key


def _load_public_key(path: Path) -> TrustedKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"--trusted-key {path}: cannot be read ({error.strerror})") from None
    if b"PRIVATE KEY" in data:
        raise ConfigError(f"--trusted-key {path}: this is a private key; give its public key "
                          "(the private key stays with whoever signs bundles)")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise ConfigError(f"--trusted-key {path}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"--trusted-key {path}: an Ed25519 key is needed, this is a "
                          f"{type(key).__name__}")
    return TrustedKey(key, path)


def load_trusted_keys(paths: Sequence[str | os.PathLike[str]]) -> list[TrustedKey]:
    """The public keys in `paths`: each a PEM file or a folder of `*.pub` / `*.pem` files.
    ConfigError when a file is not an Ed25519 public key or no key is found."""
    keys: list[TrustedKey] = []
    for given in map(Path, paths):
        if given.is_dir():
            files = sorted(p for p in given.iterdir()
                           if p.is_file() and p.suffix.lower() in PUBLIC_KEY_SUFFIXES)
            if not files:
                raise ConfigError(f"--trusted-key {given}: no public keys in this folder "
                                  f"({', '.join('*' + s for s in PUBLIC_KEY_SUFFIXES)})")
            keys += [_load_public_key(p) for p in files]
        elif given.exists():
            keys.append(_load_public_key(given))
        else:
            raise ConfigError(f"--trusted-key {given}: not found")
    if not keys:
        raise ConfigError("no trusted keys given")
    return keys


def sign_bundle(folder: str | os.PathLike[str], key: Ed25519PrivateKey | str | os.PathLike[str]
                ) -> Path:
    """Verify the bundle in `folder` (`read_bundle`), sign its identity with `key` (a loaded
    private key or a PEM file) and write `folder/bundle.sig`; returns its path."""
    private = key if not isinstance(key, str | os.PathLike) else load_private_key(key)
    bundle = read_bundle(folder)
    digest = identity(bundle)
    record = {"format": SIGNATURE_FORMAT, "algorithm": ALGORITHM, "bundle_sha256": digest,
              "key_id": key_id(private.public_key()),
              "signature": base64.b64encode(private.sign(_message(digest))).decode("ascii")}
    return atomic_write_text(Path(folder) / SIGNATURE_FILE, json.dumps(record, indent=2) + "\n")


def _read_signature(folder: Path) -> dict[str, Any]:
    path = folder / SIGNATURE_FILE
    if not path.is_file():
        raise BundleError(f"bundle {folder} is not signed (no {SIGNATURE_FILE}); a trusted key "
                          "was given, so only a bundle signed by it is used")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        record = None
    if (not isinstance(record, dict) or record.get("format") != SIGNATURE_FORMAT
            or record.get("algorithm") != ALGORITHM
            or not isinstance(record.get("signature"), str)):
        raise BundleError(f"bundle {folder}: {SIGNATURE_FILE} is not an embryo-ml {ALGORITHM} "
                          "signature; refusing to use the bundle")
    return record


def check_signature(bundle: Bundle, trusted: Sequence[TrustedKey]) -> TrustedKey:
    """The trusted key that signed `bundle` (read and verified by `read_bundle`); BundleError
    (one line) when it is unsigned, signed by another key or changed since it was signed."""
    from cryptography.exceptions import InvalidSignature

    if bundle.path is None:
        raise BundleError("bundle has no folder")
    record = _read_signature(bundle.path)
    digest = identity(bundle)
    try:
        signature = base64.b64decode(record["signature"], validate=True)
    except (binascii.Error, ValueError):
        signature = b""
    for key in trusted:
        try:
            key.key.verify(signature, _message(digest))
            return key
        except InvalidSignature:
            continue
    signer = str(record.get("key_id", "unknown"))
    if record.get("bundle_sha256") != digest:
        raise BundleError(f"bundle {bundle.path} was modified after it was signed (its identity "
                          f"is {digest[:12]}..., the signature is for "
                          f"{str(record.get('bundle_sha256'))[:12]}...); refusing to use it")
    names = ", ".join(f"{k.key_id} ({k.source.name})" for k in trusted)
    if signer in {k.key_id for k in trusted}:
        raise BundleError(f"bundle {bundle.path}: {SIGNATURE_FILE} does not verify with key "
                          f"{signer}: the signature was modified; refusing to use the bundle")
    raise BundleError(f"bundle {bundle.path} is signed by key {signer}, which is not a trusted "
                      f"key (trusted: {names}); refusing to use it")


def verify_bundle(folder: str | os.PathLike[str], trusted_keys: Sequence[str | os.PathLike[str]]
                  ) -> tuple[Bundle, TrustedKey]:
    """`read_bundle(folder)` (identity and file hashes), then `check_signature` against the
    public keys in `trusted_keys` (files or folders, `load_trusted_keys`)."""
    trusted = load_trusted_keys(trusted_keys)  # a bad key argument before any hashing
    bundle = read_bundle(folder)
    return bundle, check_signature(bundle, trusted)


def generate_key_pair(prefix: str | os.PathLike[str]) -> tuple[Path, Path, str]:
    """Write a new Ed25519 key pair: `PREFIX.key` (private, PKCS#8 PEM, readable by its owner
    only; encrypted when $EMBRYO_ML_KEY_PASSPHRASE is set) and `PREFIX.pub` (public, PEM).
    Refuses to overwrite either. Returns (private path, public path, key id)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    prefix = Path(prefix)
    private_path = prefix.with_name(prefix.name + ".key")
    public_path = prefix.with_name(prefix.name + ".pub")
    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(f"{path} exists; keygen never overwrites a key (choose another "
                              "--out, or move the old key away first)")
    if not prefix.parent.is_dir():
        raise ConfigError(f"keygen --out {prefix}: folder {prefix.parent} not found")
    key = Ed25519PrivateKey.generate()
    passphrase = _passphrase()
    encryption = (serialization.BestAvailableEncryption(passphrase) if passphrase
                  else serialization.NoEncryption())
    private_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8, encryption)
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    with atomic_path(private_path) as tmp:
        os.chmod(tmp, 0o600)  # before the secret is in it
        tmp.write_bytes(private_pem)
    atomic_write_text(public_path, public_pem.decode("ascii"))
    return private_path, public_path, key_id(key.public_key())
