"""`stage1 promote`, `rollback` and `history`: moving the champion alias by hand and reading the
promotion history. deployments/cli.py builds the parser and runs the commands."""

from __future__ import annotations

import argparse
import json


def _team_promotion(args: argparse.Namespace) -> tuple[str, object]:
    """The model and floor a promotion by hand uses: the team settings' (the floor retrain and the
    promote deployment use: stage1core.comparison.MetricFloor where the settings leave it), with only
    the flags given replaced."""
    from dataclasses import replace

    from stage1core.settings import load_settings, metric_floor

    settings = load_settings()
    given = {"min_mcc": args.min_mcc, "min_auroc": args.min_auroc}
    floor = replace(metric_floor(settings), **{k: v for k, v in given.items() if v is not None})
    return args.model or settings.model_name, floor


def _print_move(result: dict) -> None:
    if not result.get("changed", True):
        print(f"{result['model_name']}: {result['message']}")
        return
    print(f"{result['model_name']} @{result['alias']}: v{result['previous_version'] or 'none'} -> "
          f"v{result['version']} ({result['action']} by {result['requested_by']})")


def cmd_promote(args: argparse.Namespace) -> int:
    from flows.promote import promote

    model_name, floor = _team_promotion(args)
    result = promote(version=args.version, reason=args.reason, requested_by=args.by or "",
                     model_name=model_name, floor=floor)
    _print_move(result)
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from flows.promote import promote
    from tasks.registry import find_rollback_target

    model_name, floor = _team_promotion(args)
    target = args.to
    if not target:  # found here too, so that "nothing to roll back to" is one line, not a failed flow run
        target, why = find_rollback_target(model_name)
        print(f"rolling back to v{target}: {why}")
    result = promote(version=target, reason=args.reason, requested_by=args.by or "",
                     model_name=model_name, floor=floor, rollback=True)
    _print_move(result)
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from stage1core.history import history_text
    from stage1core.settings import load_settings
    from tasks.registry import read_history

    model_name = args.model or load_settings().model_name
    entries = read_history(model_name)
    total = len(entries)
    if args.limit:
        entries = entries[-args.limit:]
    print(json.dumps(entries, indent=2) if args.json else history_text(model_name, entries, total=total))
    return 0
