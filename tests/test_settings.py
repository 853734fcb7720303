"""Team settings (stage1core.settings) and self-describing configs (stage1core.config), without
Prefect or MLflow: where the settings come from, what a mistake says, the TOML round trip, the sources
a retrain reads, and image counting for `stage1 ingest`."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import replace

import pytest

from stage1core.backbone import BackboneConfig, BackboneError, resolve_backbone
from stage1core.config import describe_fields, field_comments, undescribed_fields
from stage1core.settings import (
    BUILT_IN,
    SETTINGS_ENV,
    SettingsError,
    TeamSettings,
    combine_sources,
    demo_settings,
    landed_sources,
    load_settings,
    remember_landed,
    settings_toml,
    write_settings,
)
from stage1core.sources import SourceConfig, count_images
from tests.conftest import TINY_EVA


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("STAGE1_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(SETTINGS_ENV, raising=False)
    return tmp_path / "home"


def team(tmp_path) -> TeamSettings:
    return TeamSettings(
        model_name="team-model",
        sources=(SourceConfig(path=str(tmp_path / "natix"), kind="parquet", name="natix"),
                 SourceConfig(path=str(tmp_path / "extra.csv"), role="train_only")),
        backbone=BackboneConfig(name="vit_small_patch16_dinov3", weights="random", pooling="cls+avg",
                                model_kwargs=dict(TINY_EVA), input_size=32),
        promotion={"min_mcc_gain": 0.02, "floor": {"min_mcc": 0.5, "min_auroc": 0.8}},
        launch={"num_processes": 2},
    )


def test_without_a_file_the_demo_settings_apply_and_a_named_missing_file_is_an_error(home, tmp_path, monkeypatch):
    settings = load_settings()
    assert settings.origin == BUILT_IN and settings == demo_settings()
    assert settings.backbone.weights == "efficientnet-lite0-package" and settings.sources == ()
    monkeypatch.setenv(SETTINGS_ENV, str(tmp_path / "typo.toml"))
    with pytest.raises(SettingsError, match="typo.toml does not exist.*stage1 settings init"):
        load_settings()  # a typo must not silently train on the demo data
    with pytest.raises(SettingsError, match="nope.toml does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_settings_round_trip_through_the_commented_toml(home, tmp_path):
    for settings in (team(tmp_path), demo_settings(), TeamSettings()):
        path = write_settings(settings, tmp_path / f"{id(settings)}.toml")
        text = path.read_text()
        assert "# labelled sources every training run reads" in text  # each field with its description
        back = load_settings(path)
        assert back.origin == str(path)
        assert replace(back, origin="") == replace(settings, origin="")
        assert back.fingerprint == settings.fingerprint  # content, not where it was read from
    with pytest.raises(SettingsError, match="exists; edit it, or pass --force"):
        write_settings(demo_settings(), path)


def test_the_file_in_home_is_used_and_sources_are_relative_to_it(home, tmp_path):
    home.mkdir(parents=True)
    (home / "settings.toml").write_text('schema_version = 1\nmodel_name = "m"\n\n[[sources]]\npath = "data/a"\n'
                                        '\n[guarantee]\nalpha = 0.05\n')
    settings = load_settings()
    assert settings.origin == str(home / "settings.toml") and settings.model_name == "m"
    assert settings.sources[0].path == str(home / "data" / "a") and settings.sources[0].name == "a"
    assert settings.guarantee.alpha == 0.05 and settings.guarantee.delta == 0.05  # unset fields: defaults
    assert settings.backbone == BackboneConfig()  # an omitted section is the product default


@pytest.mark.parametrize("text, message", [
    ("colour = 1\n", r"unknown setting\(s\) \['colour'\]; the settings are \["),
    ("[guarantee]\nalfa = 0.1\n",
     r"\[guarantee\]: unknown key\(s\) \['alfa'\]; GuaranteeConfig has \['alpha', 'delta'\]"),
    ("[splits]\ntrain = 0.9\nval = 0.1\ncalib = 0.1\ntest = 0.1\n", r"\[splits\]"),
    ("[[sources]]\npath = '/x'\nrole = 'test_only'\n", r"sources\[0\].*role 'test_only' is not one of"),
    ("schema_version = 7\n", "schema_version 7 is not 1"),
    ("[backbone\nname = 1\n", "not valid TOML"),
    ("sources = 'x'\n", "array of tables"),
    ("backbone_mode = 'lora'\n", r"backbone_mode 'lora' and finetune.adapter.method 'dora' disagree: set "
                                 r"finetune.adapter.method to 'lora'"),
    ("backbone_mode = 'dora'\n[train]\nepochs = 3\n", r"so these would be ignored: train.epochs = 3 \(default 40\)"),
    ("backbone_mode = 'partial'\n", r"backbone_mode must be one of \('frozen', 'lora', 'dora'\)"),
])
def test_mistakes_name_the_file_the_section_and_what_to_do(tmp_path, text, message):
    path = tmp_path / "settings.toml"
    path.write_text(text)
    with pytest.raises(SettingsError, match=message) as err:
        load_settings(path)
    assert str(path) in str(err.value)


def test_a_fine_tuning_mode_reads_its_method_and_keeps_what_it_does_not_read_at_the_defaults(tmp_path):
    path = tmp_path / "settings.toml"
    path.write_text("backbone_mode = 'lora'\n[finetune.adapter]\nmethod = 'lora'\n"
                    "[features]\nbatch_size = 8\n")  # features: the baselines' frozen probe reads them
    settings = load_settings(path)
    assert settings.backbone_mode == settings.finetune.adapter.method == "lora"
    path.write_text("backbone_mode = 'lora'\n[finetune.adapter]\nmethod = 'lora'\n[features]\nbatch_size = 8\n"
                    "[baselines]\nenabled = false\n")
    with pytest.raises(SettingsError, match=r"ignored: features.batch_size = 8 \(default 64\)"):
        load_settings(path)


def test_promotion_and_launch_are_open_tables_passed_on_as_they_are(tmp_path):
    path = write_settings(team(tmp_path), tmp_path / "s.toml")
    data = tomllib.loads(path.read_text())
    assert data["promotion"] == {"min_mcc_gain": 0.02, "floor": {"min_mcc": 0.5, "min_auroc": 0.8}}
    assert load_settings(path).launch == {"num_processes": 2}


def test_combined_sources_keep_each_path_once_and_names_distinct(tmp_path):
    a = SourceConfig(path=str(tmp_path / "a"), name="natix")
    again = SourceConfig(path=str(tmp_path / "a" / ".." / "a"), name="other")
    b = SourceConfig(path=str(tmp_path / "b"), name="natix", role="train_only")
    out = combine_sources([a], [again], [b])
    assert [s.name for s in out] == ["natix", "natix-2"] and out[1].role == "train_only"
    assert combine_sources([a], [b]) == combine_sources([a], [b])  # stable from run to run


def test_landed_sources_are_remembered_once_per_path(home, tmp_path):
    assert landed_sources() == ()
    first = SourceConfig(path=str(tmp_path / "batch1"), name="batch1")
    remember_landed([first])
    remember_landed([first, SourceConfig(path=str(tmp_path / "batch2"), name="b2", role="train_only")])
    assert [(s.name, s.role) for s in landed_sources()] == [("batch1", "all"), ("b2", "train_only")]
    record = json.loads((home / "sources" / "landed.json").read_text())
    assert all("last_trained_at" in row for row in record["sources"])
    (home / "sources" / "landed.json").write_text("{")
    with pytest.raises(SettingsError, match="unreadable record of landed sources"):
        landed_sources()


def test_ingest_counts_images_not_the_label_files_beside_them(tmp_path):
    from stage1core.demo import DemoConfig, generate_demo_dataset

    out = tmp_path / "landed"
    generate_demo_dataset(out, DemoConfig(n_images=60, seed=5, n_large=0, png_fraction=0.2, exif_fraction=0.0))
    assert (out / "labels.csv").exists() and (out / "demo.json").exists()
    counted = count_images(SourceConfig(path=str(out)))
    assert counted == {"kind": "folder", "n_images": 60, "n_roadwork": counted["n_roadwork"]}
    assert 0 < counted["n_roadwork"] < 60
    by_csv = count_images(SourceConfig(path=str(out / "labels.csv")))
    assert by_csv["kind"] == "csv" and by_csv["n_images"] == 60 and by_csv["n_roadwork"] == counted["n_roadwork"]


def test_every_field_of_the_team_settings_tree_is_described():
    def walk(cls, seen):
        if cls in seen:
            return
        seen.add(cls)
        assert undescribed_fields(cls) == [], cls.__name__
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                walk(type(default), seen)

    seen: set = set()
    walk(TeamSettings, seen)
    walk(SourceConfig, seen)
    assert len(seen) >= 12


def test_describe_fields_reads_comments_above_and_beside_each_field():
    @describe_fields
    @dataclasses.dataclass(frozen=True)
    class Example:
        """Docstring: a: not a field comment."""

        # the first line
        # and the second
        a: int = 1
        b: str = "x"  # beside b
        c: float = 0.5

    assert field_comments(Example) == {"a": "the first line and the second", "b": "beside b"}
    assert undescribed_fields(Example) == ["c"]


def test_backbone_weights_are_a_closed_set_plus_a_file(tmp_path):
    path = tmp_path / "w.safetensors"
    legacy = BackboneConfig(name="vit_small_patch16_dinov3", weights=str(path))  # a path, as callers wrote it
    assert legacy.weights == "file" and legacy.weights_file == str(path)
    assert legacy == BackboneConfig(name="vit_small_patch16_dinov3", weights="file", weights_file=str(path))
    with pytest.raises(BackboneError, match="weights='file' needs weights_file"):
        BackboneConfig(weights="file")
    with pytest.raises(BackboneError, match="does not exist"):
        resolve_backbone(legacy)


def test_settings_toml_is_valid_toml_for_every_preset(tmp_path):
    for settings in (demo_settings(), TeamSettings(), team(tmp_path)):
        data = tomllib.loads(settings_toml(settings))
        assert data["schema_version"] == 1 and data["backbone"]["name"] == settings.backbone.name
