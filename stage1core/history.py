"""The promotion history of a registered model: append-only entries (who, when, why, which version
took the alias from which, the comparison figures), where a rollback goes, and how it reads.

Storage is the registry's tags (tasks/registry.py writes them): one tag per entry, keyed by the time
it was written, so appending never reads-modifies-writes a shared value and two writers cannot
overwrite each other; the same entry goes on the registered model and on each version it names.
"""

from __future__ import annotations

import datetime as _dt
import json
from typing import Any

PREFIX = "promotion_history."
# MLflow's SQL store keeps a registered model's tag values in a 5,000-character column (Postgres refuses
# longer ones); an entry stays well under
MAX_ENTRY_CHARS = 4000
# what an entry records; `keep` = retrain judged a challenger and left the alias where it was
ACTIONS = ("promote", "rollback", "keep")


def entry_key(at: _dt.datetime) -> str:
    """Tag key of an entry written at `at` (UTC): sorts in time order, microseconds apart."""
    return PREFIX + at.astimezone(_dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")


def encode_entry(entry: dict[str, Any]) -> str:
    """Compact JSON under MAX_ENTRY_CHARS: an over-long reason is cut, never the figures."""
    text = json.dumps(entry, separators=(",", ":"), sort_keys=True)
    if len(text) > MAX_ENTRY_CHARS:
        reason = entry.get("reason", "")
        keep = max(0, len(reason) - (len(text) - MAX_ENTRY_CHARS) - 20)
        text = json.dumps({**entry, "reason": reason[:keep] + " [cut]"}, separators=(",", ":"), sort_keys=True)
    return text


def entries_from_tags(tags: dict[str, str]) -> list[dict[str, Any]]:
    """The entries in time order, numbered from 1 (unreadable ones are kept as such, not dropped)."""
    out = []
    for key in sorted(k for k in tags if k.startswith(PREFIX)):
        try:
            entry = json.loads(tags[key])
        except ValueError:
            entry = {"action": "unreadable", "reason": tags[key][:200]}
        out.append({**entry, "key": key})
    for n, entry in enumerate(out, start=1):
        entry["n"] = n
    return out


def _moves(entries: list[dict[str, Any]], alias: str) -> list[dict[str, Any]]:
    return [e for e in entries if e.get("alias", "champion") == alias and e.get("action") in ("promote", "rollback")]


def rollback_target(entries: list[dict[str, Any]], current: str | None, *, alias: str = "champion",
                    fallback: str | None = None) -> tuple[str | None, str]:
    """(version to roll back to, why) from the current alias holder.

    A rollback returns to the version the current one replaced when it was last *promoted*; moves
    that were themselves rollbacks are skipped, so rolling back twice walks further back (v3 -> v2
    -> v1) instead of undoing the first rollback. `fallback`: the version's `previous_version` tag,
    for versions promoted before the history existed.
    """
    if current is None:
        return None, f"no version holds @{alias}: nothing to roll back"
    for entry in reversed(_moves(entries, alias)):
        if str(entry.get("version")) == str(current) and entry["action"] == "promote":
            before = entry.get("from_version")
            if not before:
                return None, f"v{current} was the first @{alias} (history entry {entry['n']}): nothing to roll back to"
            return str(before), (f"v{current} replaced v{before} on {entry.get('at', '?')} "
                                 f"(history entry {entry['n']}, by {entry.get('by', '?')})")
    if fallback and fallback != "none" and fallback != str(current):
        return fallback, f"v{current}'s tag {alias}.previous_version (promoted before the history existed)"
    return None, f"the history has no promotion of v{current} to @{alias}: give the version to roll back to"


def rolled_back_from(entries: list[dict[str, Any]], version: str, *, alias: str = "champion") -> dict[str, Any] | None:
    """The rollback entry that removed `version` from the alias, if that is the latest thing that
    happened to it (a person decided against it: automatic retraining must not bring it back)."""
    for entry in reversed(_moves(entries, alias)):
        if str(entry.get("from_version")) == str(version) and entry["action"] == "rollback":
            return entry
        if str(entry.get("version")) == str(version):
            return None
    return None


def _v(version: Any) -> str:
    return f"v{version}" if version not in (None, "", "none") else "-"


def history_rows(entries: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One row per entry, for a table: n, when, action, alias holder after, before, challenger, by, reason."""
    return [{"n": str(e["n"]), "at": str(e.get("at", "")), "action": str(e.get("action", "")),
             "alias": str(e.get("alias", "champion")), "champion": _v(e.get("version")),
             "from": _v(e.get("from_version")), "challenger": _v(e.get("challenger")),
             "by": str(e.get("by", "")), "reason": str(e.get("reason", ""))} for e in entries]


def history_text(model_name: str, entries: list[dict[str, Any]], *, total: int | None = None) -> str:
    """The history as plain text for a terminal, oldest first; `total`: the whole history's length when
    `entries` are its last few."""
    if not entries:
        return f"{model_name}: no promotion history yet"
    rows = history_rows(entries)
    cols = ("n", "at", "action", "alias", "champion", "from", "challenger", "by")
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    shown = f"last {len(rows)} of {total}" if total is not None and total > len(rows) else f"{len(rows)}"
    lines = [f"{model_name}: {shown} entries, oldest first",
             "  ".join(c.ljust(widths[c]) for c in cols) + "  reason"]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in cols) + "  " + r["reason"] for r in rows]
    return "\n".join(lines)


def history_markdown(model_name: str, entries: list[dict[str, Any]]) -> str:
    """The history as a markdown table (Prefect artifact), newest first."""
    lines = [f"# Promotion history of {model_name}", "",
             "| # | when (UTC) | action | alias | champion | from | challenger | by | reason |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in reversed(history_rows(entries)):
        reason = r["reason"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r['n']} | {r['at']} | {r['action']} | {r['alias']} | {r['champion']} | {r['from']} | "
                     f"{r['challenger']} | {r['by']} | {reason} |")
    return "\n".join(lines) + "\n"
