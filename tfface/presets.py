"""Named model configurations, as keras-hub's presets but architecture only.

No weights can be downloaded here, so a preset names a tested
`ModelConfig`: which model, backbone, input size and head settings. Build
one with `tfface.models.from_preset(name, schema)` (or the model class's
`from_preset`), or start a YAML config's `model:` section from it with
`preset: NAME` and override single keys beside it.
Keras-applications backbones accept `backbone_weights=` a local file (or
"imagenet" where online) as an override.
"""

from __future__ import annotations

import dataclasses

from tfface.config import ConfigError
from tfface.config import ModelConfig

_FAMILY_WEIGHTS = {"attributes": 1.0, "age_group": 0.5, "gender": 0.5, "race": 0.25}

# What `configs/*_real.yaml` trained on the real faces (docs/results.md),
# without the choices that need training data (`correlation_init`).
_GATED = dict(
    type="gated", gate="static", correlation=True, center_loss_weight=0.01, dropout=0.3,
    loss_weights=_FAMILY_WEIGHTS,
)
_MASK_GUIDED = dict(type="mask_guided", fusion="group_global", dropout=0.1, mask_loss_weight=0.5,
                    loss_weights=_FAMILY_WEIGHTS)

MODEL_PRESETS = {
    "gated_small_cnn_64": {
        "description": "gated MTL-CNN, small CNN at 64 px: the 30-minute CPU set-up of configs/gated_real.yaml",
        "config": dict(_GATED, backbone="small_cnn", image_size=64, embedding_dim=64),
    },
    "gated_small_cnn_128": {
        "description": "gated MTL-CNN, small CNN at 128 px (about 3x the compute of 64 px)",
        "config": dict(_GATED, backbone="small_cnn", image_size=128, embedding_dim=64),
    },
    "gated_mobilenet_v3_small_128": {
        "description": "gated MTL-CNN on MobileNetV3-Small at 128 px (for ImageNet weights from a local file)",
        "config": dict(_GATED, backbone="mobilenet_v3_small", image_size=128, embedding_dim=128),
    },
    "gated_resnet50_224": {
        "description": "gated MTL-CNN at the paper's scale (docs/design.md): ResNet-50 at 224 px, 256-d task embeddings",
        "config": dict(_GATED, backbone="resnet50", image_size=224, embedding_dim=256, gate_hidden=128),
    },
    "mask_guided_small_cnn_64": {
        "description": "mask-guided MGMTN, small CNN at 64 px: the set-up of configs/mask_guided_real.yaml",
        "config": dict(_MASK_GUIDED, backbone="small_cnn", image_size=64, embedding_dim=64),
    },
}


def list_presets() -> dict:
    """Preset name -> one-line description."""
    return {name: preset["description"] for name, preset in MODEL_PRESETS.items()}


def preset_values(name: str, overrides: dict | None = None) -> dict:
    """The preset's config values with `overrides` on top, as a new dict (a
    YAML `model:` section starts from these). `loss_weights` overrides set
    single families or tasks; the preset's other weights stay."""
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; presets: {sorted(MODEL_PRESETS)}")
    preset = MODEL_PRESETS[name]["config"]
    values = {**preset, **(overrides or {})}
    weights = values.get("loss_weights")
    if isinstance(weights, dict):  # a new dict, merged (anything else is refused by validation)
        values["loss_weights"] = {**preset.get("loss_weights", {}), **weights}
    return values


def preset_config(name: str, **overrides) -> ModelConfig:
    """The `ModelConfig` of a preset, with `overrides` (ModelConfig fields)."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown model config key(s) {unknown} for preset {name!r}")
    config = ModelConfig(**preset_values(name, overrides))
    config.validate()
    return config


def from_preset(name: str, /, schema="fused", train_labels=None, *, model_class=None, **overrides):
    """A new (untrained) model from a preset.

    Args:
        name: the preset (positional: `name=` is the Keras model's name,
            as for any Keras model).
        schema: a `Schema` or a schema preset name ("fused", "celeba", ...).
        train_labels: training labels, only for
            `correlation_init="label_correlation"` (see `build_model`).
        model_class: if given, a preset of another model type is refused
            (what `GatedMultiTaskModel.from_preset` passes).
        **overrides: ModelConfig fields, e.g. `image_size=96`,
            `backbone_weights="mobilenet_v3_small.weights.h5"`.
    """
    from tfface.models.build import build_model
    from tfface.schema import get_schema

    model_name = overrides.pop("name", None)
    config = preset_config(name, **overrides)
    expected_type = getattr(model_class, "model_type", None)
    if expected_type and config.type != expected_type:
        raise ConfigError(f"preset {name!r} is a {config.type} model, not a {model_class.__name__}")
    schema = get_schema(schema) if isinstance(schema, str) else schema
    return build_model(schema, config, train_labels, name=model_name)
