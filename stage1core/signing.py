"""Ed25519 signatures over a bundle's manifest: who made a bundle, not only whether it is intact.

The manifest lists the sha256 of every file and its own fingerprint, so signing the manifest's bytes
signs the whole bundle. The signature lives beside it in `manifest.sig` (JSON: algorithm, key id,
base64 signature); it is not listed in the manifest, and adding it changes no hash or fingerprint.
Keys are PEM files (PKCS8 private, SubjectPublicKeyInfo public) from `cryptography`, which MLflow
already installs.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from .fingerprint import sha256_bytes
from .storage import atomic_write_bytes

SIGNATURE = "manifest.sig"
ALGORITHM = "ed25519"


class SignatureError(ValueError):
    """A key that cannot be read, or a signature that is missing or does not verify."""


def _serialization():
    from cryptography.hazmat.primitives import serialization

    return serialization


def _public_bytes(public_key) -> bytes:
    s = _serialization()
    return public_key.public_bytes(encoding=s.Encoding.Raw, format=s.PublicFormat.Raw)


def key_id(public_key) -> str:
    """A short name for a public key: sha256 of its 32 raw bytes, 16 hex digits."""
    return sha256_bytes(_public_bytes(public_key))[:16]


def generate_keypair(out_dir: str | Path, *, name: str = "stage1-bundle") -> tuple[Path, Path]:
    """Write `<name>.key` (private, mode 0600) and `<name>.pub` under `out_dir`; refuse to overwrite."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    s = _serialization()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out / f"{name}.key", out / f"{name}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise SignatureError(f"{path} exists; move it away or choose another folder (keys are never overwritten)")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(encoding=s.Encoding.PEM, format=s.PrivateFormat.PKCS8,
                                    encryption_algorithm=s.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem)
    public_path.write_bytes(key.public_key().public_bytes(encoding=s.Encoding.PEM,
                                                          format=s.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


def load_private_key(path: str | Path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = _serialization().load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"{path}: cannot read an ed25519 private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an ed25519 private key ({type(key).__name__})")
    return key


def load_public_key(path: str | Path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = _serialization().load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"{path}: cannot read an ed25519 public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path}: not an ed25519 public key ({type(key).__name__})")
    return key


def sign_manifest(bundle_dir: str | Path, private_key_path: str | Path) -> Path:
    """Sign `manifest.json`'s bytes; write `manifest.sig` atomically. Returns its path."""
    root = Path(bundle_dir)
    key = load_private_key(private_key_path)
    signature = key.sign((root / "manifest.json").read_bytes())
    doc = {"algorithm": ALGORITHM, "key_id": key_id(key.public_key()),
           "signature": base64.b64encode(signature).decode()}
    path = root / SIGNATURE
    atomic_write_bytes(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
    return path


def verify_manifest(bundle_dir: str | Path, public_key_path: str | Path) -> str:
    """Check `manifest.sig` against `manifest.json` and the public key; returns the key id.
    Raises SignatureError saying what is wrong and what to do."""
    from cryptography.exceptions import InvalidSignature

    root = Path(bundle_dir)
    key = load_public_key(public_key_path)
    expected_id = key_id(key)
    sig_path = root / SIGNATURE
    if not sig_path.is_file():
        raise SignatureError(f"{root}: not signed (no {SIGNATURE}), and STAGE1_BUNDLE_PUBLIC_KEY={public_key_path} "
                             f"requires a signature; sign it with `stage1 sign {root}` where the team key is")
    try:
        doc = json.loads(sig_path.read_bytes())
        signature = base64.b64decode(doc["signature"], validate=True)
        algorithm, signer = doc["algorithm"], doc.get("key_id", "?")
    except (ValueError, KeyError, TypeError) as exc:
        raise SignatureError(f"{sig_path}: unreadable signature file ({type(exc).__name__}: {exc})") from exc
    if algorithm != ALGORITHM:
        raise SignatureError(f"{sig_path}: algorithm {algorithm!r}; only {ALGORITHM} is accepted")
    try:
        key.verify(signature, (root / "manifest.json").read_bytes())
    except InvalidSignature:
        raise SignatureError(
            f"{root}: the manifest's signature does not verify with key {expected_id} ({public_key_path}; signed by "
            f"key {signer}): the bundle was changed after it was signed, or signed by another key") from None
    return expected_id
