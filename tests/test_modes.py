"""Backbone modes (stage1core.modes): the mode is the one switch, and no parameter is silently ignored."""

from __future__ import annotations

from dataclasses import replace

import pytest

from stage1core.baselines import BaselineConfig
from stage1core.features import FeatureConfig
from stage1core.finetune import FinetuneConfig
from stage1core.modes import BackboneModeError, changed_fields, check_backbone_mode
from stage1core.peft import AdapterConfig
from stage1core.selection import SelectionConfig
from stage1core.train import TrainConfig

LORA = FinetuneConfig(adapter=AdapterConfig(method="lora"))


def check(mode: str, **over):
    values = dict(finetune=FinetuneConfig(), features=FeatureConfig(), train=TrainConfig(),
                  selection=SelectionConfig(), baselines=BaselineConfig())
    values.update(over)
    return check_backbone_mode(mode, **values)


def test_changed_fields_name_each_difference_with_its_default():
    assert changed_fields("train", TrainConfig(), TrainConfig()) == []
    assert changed_fields("train", TrainConfig(epochs=3, lr=0.01), TrainConfig()) == [
        "train.epochs = 3 (default 40)", "train.lr = 0.01 (default 0.001)"]
    assert changed_fields("finetune", LORA, FinetuneConfig()) == [
        "finetune.adapter.method = 'lora' (default 'dora')"]
    assert changed_fields("merge_adapters", True, False) == ["merge_adapters = True (default False)"]


def test_the_adapter_method_must_name_the_mode():
    assert check("dora") == [] and check("lora", finetune=LORA) == []
    with pytest.raises(BackboneModeError, match="backbone_mode 'lora' and finetune.adapter.method 'dora' disagree: "
                                                "set finetune.adapter.method to 'lora' as well"):
        check("lora")
    with pytest.raises(BackboneModeError, match="backbone_mode 'dora' and finetune.adapter.method 'lora'"):
        check("dora", finetune=LORA)
    with pytest.raises(BackboneModeError, match="backbone_mode must be one of"):
        check("qlora")


@pytest.mark.parametrize("over, named", [
    (dict(train=TrainConfig(epochs=4)), "train.epochs = 4"),
    (dict(selection=SelectionConfig(enabled=False)), "selection.enabled = False"),
    (dict(features=FeatureConfig(num_workers=0), baselines=BaselineConfig(enabled=False)), "features.num_workers = 0"),
])
def test_fine_tuning_refuses_settings_it_would_ignore(over, named):
    with pytest.raises(BackboneModeError, match=f"would be ignored: {named}.*backbone_mode to 'frozen'"):
        check("dora", **over)


def test_features_configure_the_baselines_probe_when_fine_tuning():
    assert check("dora", features=FeatureConfig(batch_size=8, num_workers=0)) == []


def test_frozen_mode_lists_the_fine_tuning_settings_it_does_not_use():
    from tasks.finetune import LaunchConfig

    assert check("frozen", launch=LaunchConfig()) == []
    # train, selection and features are what frozen reads: any values
    assert check("frozen", train=TrainConfig(epochs=4), selection=SelectionConfig(enabled=False)) == []
    unused = check("frozen", finetune=replace(FinetuneConfig(), epochs=2), merge_adapters=True,
                   launch=LaunchConfig(num_processes=4))
    assert unused == ["finetune.epochs = 2 (default 10)", "merge_adapters = True (default False)",
                      "launch.num_processes = 4 (default 1)"]
