"""`stage1 settings show` and `settings init`: the team settings file. deployments/cli.py builds the
parser and runs the commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_settings(args: argparse.Namespace) -> int:
    from stage1core.settings import (
        demo_settings,
        landed_sources,
        load_settings,
        settings_path,
        settings_toml,
        write_settings,
    )

    if args.action == "show":
        settings = load_settings()
        if args.toml:
            print(settings_toml(settings), end="")
            return 0
        print(json.dumps({"origin": settings.origin, "fingerprint": settings.fingerprint,
                          "settings": settings.to_json(),
                          "landed_sources": [s.path for s in landed_sources()]}, indent=2))
        return 0
    # init: the demo settings, or the product defaults, with the flags applied
    from dataclasses import replace

    from stage1core.settings import TeamSettings
    from tasks.settings import default_tables

    settings = demo_settings() if args.preset == "demo" else TeamSettings()
    tables, notes = default_tables()
    settings = replace(settings, **tables)
    if args.source:
        settings = replace(settings, sources=tuple(_init_source(text) for text in args.source))
    backbone = settings.backbone
    if args.backbone:
        backbone = replace(backbone, name=args.backbone)
    if args.weights:
        backbone = replace(backbone, weights=args.weights, weights_file="")
    if args.pooling:
        backbone = replace(backbone, pooling=args.pooling)
    settings = replace(settings, backbone=backbone, model_name=args.model_name or settings.model_name)
    out = Path(args.out) if args.out else settings_path()[0]
    written = write_settings(settings, out, force=args.force, notes=notes)
    load_settings(written)  # what was written reads back
    print(f"team settings written to {written}")
    _report_sources(settings.sources)
    if not settings.sources:
        print("  no sources: runs use the procedural demo data; add [[sources]] or pass --source")
    if out != settings_path()[0]:
        print(f"point stage1 at it: export STAGE1_SETTINGS={written}")
    return 0


def _report_sources(sources) -> None:
    """Count each source's images now, so a wrong path or layout shows at setup, not in the nightly run."""
    from stage1core.sources import DataError, count_images

    for source in sources:
        try:
            counted = count_images(source)
            print(f"  source {source.name}: {counted['n_images']} images ({counted['n_roadwork']} roadwork), "
                  f"{counted['kind']}, role {source.role}")
        except DataError as exc:
            print(f"  warning: {exc} (fine if the path exists only on the workers)")


def _init_source(text: str):
    """PATH[:name=NAME][:role=train_only][:kind=KIND] -> SourceConfig."""
    from stage1core.sources import SourceConfig

    path, *options = text.split(":")
    values = {}
    for option in options:
        key, _, value = option.partition("=")
        if key not in ("name", "role", "kind") or not value:
            raise ValueError(f"--source {text!r}: options are name=..., role=all|train_only, kind=folder|csv|"
                             "json|parquet|auto, separated by ':'")
        values[key] = value
    return SourceConfig(path=str(Path(path).expanduser().absolute()), **values)
