"""`stage1 predict`, `keygen` and `sign`: the commands on bundles, none of which runs a flow.
deployments/cli.py builds the parser and runs the commands."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from stage1core.home import prepare_home


def cmd_predict(args: argparse.Namespace) -> int:
    """One JSON line per input, in order; an input that cannot be read or decoded gets {"image", "error"}
    and a line on stderr, the others are predicted, and the exit code is 1 at the end."""
    from stage1core.bundle import load_bundle

    items = expand_inputs(args.images, stdin=sys.stdin.buffer)
    bundle, expected = _bundle_for_prediction(args.bundle)
    predictor = load_bundle(bundle, weights_override=args.weights, expected_fingerprint=expected)
    images = [data for _, data, problem in items if problem is None]
    predicted = iter(predictor.predict(images, errors="report") if images else [])
    failed = 0
    for name, _, problem in items:
        result = {"error": problem} if problem is not None else next(predicted)
        print(json.dumps({"image": name, **result}), flush=True)
        if "error" in result:
            failed += 1
            print(f"stage1: {name}: {result['error'].removeprefix(f'{name}: ')}", file=sys.stderr)
    if failed:
        print(f"stage1: {failed} of {len(items)} inputs could not be predicted (listed above)", file=sys.stderr)
        return 1
    return 0


PREDICT_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def expand_inputs(args: list[str], *, stdin) -> list[tuple[str, str | bytes | None, str | None]]:
    """(name, path or bytes, None) per image and (name, None, reason) per argument that names no image,
    in the order given. A directory stands for the images in it (recursively, sorted); `-` reads stdin,
    which holds either one image (its bytes) or a list of paths, one per line."""
    items: list[tuple[str, str | bytes | None, str | None]] = []
    for arg in args:
        if arg == "-":
            data = stdin.read()
            if _looks_like_image(data):
                items.append(("-", data, None))
                continue
            try:
                paths = [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]
            except UnicodeDecodeError:
                items.append(("-", None, "stdin is neither an image (JPEG, PNG, WebP, BMP) nor a list of paths"))
                continue
            if not paths:
                items.append(("-", None, "stdin is empty: pipe one image, or a list of paths one per line"))
            items += expand_inputs([p for p in paths if p != "-"], stdin=stdin)
            continue
        path = Path(arg)
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in PREDICT_SUFFIXES and p.is_file())
            if not found:
                items.append((arg, None, f"a directory with no images ({', '.join(PREDICT_SUFFIXES)}) in it"))
            items += [(p, p, None) for p in found]
        else:
            items.append((arg, arg, None))
    return items


def _looks_like_image(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff" or data[:8] == b"\x89PNG\r\n\x1a\n" or data[:2] == b"BM" or (
        data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _bundle_for_prediction(ref: str) -> tuple[str, str | None]:
    """A bundle directory as given, or a registered version (`models:/<name>/<version>` or `@alias`),
    fetched and tied to the fingerprint recorded when it was registered."""
    if not ref.startswith("models:/"):
        return ref, None
    prepare_home()
    from stage1core.settings import load_settings
    from tasks.registry import fetch_bundle, get_version, parse_model_ref

    name, version, alias = parse_model_ref(ref, load_settings().model_name)
    mv = get_version(name, version=version, alias=alias)
    if mv is None:
        raise ValueError(f"{ref}: no such registered version in "
                         f"MLFLOW_TRACKING_URI={os.environ['MLFLOW_TRACKING_URI']}")
    expected = mv.tags.get("bundle_fingerprint")
    if not expected:
        raise ValueError(f"{ref}: the version has no bundle_fingerprint tag, so its bundle cannot be checked; "
                         "register the bundle again with stage1")
    return str(fetch_bundle(name, mv)), expected


def cmd_keygen(args: argparse.Namespace) -> int:
    from stage1core.signing import generate_keypair

    private, public = generate_keypair(args.out)
    print(json.dumps({"private_key": str(private), "public_key": str(public)}, indent=2))
    print(f"sign bundles: STAGE1_BUNDLE_SIGNING_KEY={private}; require signatures: STAGE1_BUNDLE_PUBLIC_KEY={public}",
          file=sys.stderr)
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    from stage1core.bundle import read_manifest
    from stage1core.home import bundle_signing_key
    from stage1core.signing import sign_manifest

    key = args.key or bundle_signing_key()
    if key is None:
        raise ValueError("no signing key: pass --key or set STAGE1_BUNDLE_SIGNING_KEY (make one with `stage1 keygen`)")
    manifest = read_manifest(args.bundle)  # only an intact bundle is signed
    print(json.dumps({"bundle": args.bundle, "fingerprint": manifest["fingerprint"],
                      "signature": str(sign_manifest(args.bundle, key))}))
    return 0
