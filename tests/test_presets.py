"""Named model architectures (tfface.presets)."""

import numpy as np
import pytest

from tfface.config import ConfigError
from tfface.config import ExperimentConfig
from tfface.models import GatedMultiTaskModel
from tfface.models import MaskGuidedMultiTaskModel
from tfface.models import from_preset
from tfface.presets import MODEL_PRESETS
from tfface.presets import list_presets
from tfface.presets import preset_config


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_every_preset_is_a_valid_config_of_the_type_it_names(name):
    config = preset_config(name)
    assert name.startswith(config.type)
    assert name.split("_")[-1] == str(config.image_size)
    assert list_presets()[name]


@pytest.mark.parametrize(
    "name, model_class",
    [
        ("gated_small_cnn_64", GatedMultiTaskModel),
        ("mask_guided_small_cnn_64", MaskGuidedMultiTaskModel),
        ("gated_mobilenet_v3_small_128", GatedMultiTaskModel),
        ("gated_resnet50_224", GatedMultiTaskModel),
    ],
)
def test_presets_build_models_that_predict_every_task(name, model_class):
    model = model_class.from_preset(name, "synthetic")
    assert isinstance(model, model_class) and model.model_config == preset_config(name)
    size = model.image_size
    outputs = model.predict_tasks(np.full((2, size, size, 3), 128, np.float32))
    assert sorted(outputs) == sorted(model.schema.task_names)
    assert all(len(v) == 2 and np.isfinite(v).all() for v in outputs.values())


def test_preset_overrides_and_refusals():
    model = from_preset("gated_small_cnn_64", "synthetic", image_size=32, backbone_widths=(8, 16, 32, 64))
    assert model.image_size == 32 and model.model_config.gate == "static"
    # name= is the Keras model's name, as for any Keras model.
    named = GatedMultiTaskModel.from_preset("gated_small_cnn_64", "synthetic", image_size=32, backbone_widths=(8, 16, 32, 64), name="faces")
    assert named.name == "faces" and named.image_size == 32
    with pytest.raises(ConfigError, match=r"unknown model preset 'gated_tiny'.*gated_small_cnn_64"):
        from_preset("gated_tiny")
    with pytest.raises(ConfigError, match=r"unknown model config key\(s\) \['gates'\]"):
        preset_config("gated_small_cnn_64", gates="none")
    with pytest.raises(ConfigError, match="model.dropout"):
        preset_config("gated_small_cnn_64", dropout=2.0)
    with pytest.raises(ConfigError, match="'gated_small_cnn_64' is a gated model, not a MaskGuidedMultiTaskModel"):
        MaskGuidedMultiTaskModel.from_preset("gated_small_cnn_64")
    with pytest.raises(ConfigError, match="label_correlation.*needs the training labels"):
        from_preset("gated_small_cnn_64", correlation_init="label_correlation")


def test_a_yaml_model_section_starts_from_a_preset(tmp_path):
    raw = {
        "data": {"sources": ["synthetic:10"], "schema": "synthetic", "image_size": 64},
        "model": {"preset": "gated_small_cnn_64", "dropout": 0.2, "loss_weights": {"gender": 2.0}},
    }
    config = ExperimentConfig.from_dict(raw)
    expected = preset_config("gated_small_cnn_64", dropout=0.2, loss_weights={"gender": 2.0})
    assert config.model == expected
    # A loss weight set beside the preset changes that family only.
    assert expected.loss_weights == {"attributes": 1.0, "age_group": 0.5, "gender": 2.0, "race": 0.25}
    # Saved configs spell every value out, so they load without the preset table.
    config.save(tmp_path / "run.yaml")
    assert "preset" not in (tmp_path / "run.yaml").read_text()
    assert ExperimentConfig.load(tmp_path / "run.yaml").model == expected
    raw["model"]["preset"] = "vgg_64"
    with pytest.raises(ConfigError, match="unknown model preset 'vgg_64'"):
        ExperimentConfig.from_dict(raw)


def test_docstring_style_access_through_the_package(tmp_path):
    import tfface

    model = tfface.models.GatedMultiTaskModel(
        schema=tfface.schema.get_schema("synthetic"),
        config=tfface.config.ModelConfig(image_size=32, backbone_widths=(8, 16, 32, 64), embedding_dim=8),
    )
    assert model.image_size == 32 and "presets" in dir(tfface)
    model.save(tmp_path / "m.keras")
    assert tfface.models.load_model(tmp_path / "m.keras").schema == model.schema
    with pytest.raises(AttributeError, match="no attribute 'modles'"):
        tfface.modles


def test_data_and_training_name_their_entry_points():
    # `tfface.training` said it holds `train`, and `tfface.data` exported
    # nothing: users had to know the module of each function.
    import tfface
    from tfface.data.pipeline import make_dataset
    from tfface.data.source import FaceSource
    from tfface.training.trainer import train

    assert tfface.data.make_dataset is make_dataset and tfface.data.FaceSource is FaceSource
    assert tfface.training.train is train
    for package in (tfface.data, tfface.training):
        assert set(package.__all__) <= set(dir(package))
        for name in package.__all__:
            assert callable(getattr(package, name)), name
    with pytest.raises(AttributeError, match="no attribute 'make_datset'"):
        tfface.data.make_datset
