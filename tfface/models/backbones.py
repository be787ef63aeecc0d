"""Shared backbones: image (0..255) -> feature pyramid {"P3", "P4", "P5"}.

Every task of every model reads the same backbone (the MTL-CNN shares all
backbone parameters). `P3`/`P4`/`P5` are the last feature maps at strides 8,
16 and 32; the gated model reads `P5`, the mask-guided model all three.

`small_cnn` is a fast plain CNN for CPU work and tests. The
`keras.applications` backbones take `weights=None` (default: nothing can be
downloaded here), a local weights file, or "imagenet" when online.
"""

from __future__ import annotations

import os
from typing import Optional

import keras
from keras import layers

PYRAMID_STRIDES = {"P3": 8, "P4": 16, "P5": 32}


def _conv_bn_relu(x, filters, stride, name):
    x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def _small_cnn(inputs, widths):
    """Stem at stride 2, then one strided stage per width (stride 4..32)."""
    if len(widths) != 4:
        raise ValueError(f"small_cnn needs 4 stage widths, got {list(widths)}")
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="normalize")(inputs)
    x = _conv_bn_relu(x, widths[0] // 2, 2, "stem")
    features = {}
    for i, width in enumerate(widths):
        stride = 2 ** (i + 2)
        x = _conv_bn_relu(x, width, 2, f"stage{i + 1}_a")
        x = _conv_bn_relu(x, width, 1, f"stage{i + 1}_b")
        for level, level_stride in PYRAMID_STRIDES.items():
            if level_stride == stride:
                features[level] = x
    return features


def local_weights_file(weights) -> Optional[str]:
    """The local file `model.backbone_weights` names (user folder
    expanded), None for none or "imagenet"; ValueError for an empty name,
    FileNotFoundError for a missing file (training checks it before it
    writes anything; the network is built later)."""
    if weights is None or weights == "imagenet":
        return None
    if not str(weights).strip():
        raise ValueError('model.backbone_weights is empty: give a weights file, "imagenet" or null')
    path = os.path.expanduser(weights)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.backbone_weights: file not found: {path}")
    return path


@keras.saving.register_keras_serializable(package="tfface")
class CaffePreprocessing(keras.layers.Layer):
    """ResNet50's caffe-style input (BGR, ImageNet means subtracted) from
    RGB 0..255, in the graph so every backbone takes the same images. A
    layer rather than a Lambda so a saved model needs no pickled closure."""

    def call(self, images):
        return keras.applications.resnet.preprocess_input(images)

    def compute_output_shape(self, input_shape):
        return input_shape


def _applications_model(name, inputs, weights):
    apps = keras.applications
    weights = local_weights_file(weights) or weights
    load = "imagenet" if weights == "imagenet" else None
    common = dict(include_top=False, weights=load, input_tensor=inputs)
    if name == "mobilenet_v3_small":
        model = apps.MobileNetV3Small(include_preprocessing=True, **common)
    elif name == "mobilenet_v3_large":
        model = apps.MobileNetV3Large(include_preprocessing=True, **common)
    elif name == "efficientnet_b0":
        model = apps.EfficientNetB0(**common)
    elif name == "resnet50":
        # ResNet50 expects caffe-style inputs; put the conversion in-graph.
        x = CaffePreprocessing(name="caffe_preprocess")(inputs)
        model = apps.ResNet50(include_top=False, weights=load, input_tensor=x)
    else:  # pragma: no cover - validated by ModelConfig
        raise ValueError(f"unknown backbone {name!r}")
    if weights not in (None, "imagenet"):
        model.load_weights(weights, skip_mismatch=False)
    return model


def _pyramid_from_model(model, image_size):
    """The last layer output at each pyramid stride."""
    features = {}
    for layer in model.layers:
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):
            continue
        if len(shape) != 4 or shape[1] is None:
            continue
        for level, stride in PYRAMID_STRIDES.items():
            if shape[1] == image_size // stride:
                features[level] = layer.output
    # The model's own output is the stride-32 map; a later 1x1 squeeze-and-
    # excite tensor must not stand in for it at small sizes.
    features["P5"] = model.output
    missing = set(PYRAMID_STRIDES) - set(features)
    if missing:
        raise ValueError(f"backbone has no feature map for {sorted(missing)}")
    return features


def build_backbone(config) -> keras.Model:
    """Functional backbone model for a `ModelConfig`."""
    size = config.image_size
    inputs = keras.Input((size, size, 3), name="image")
    if config.backbone == "small_cnn":
        if config.backbone_weights not in (None, ""):
            raise ValueError("small_cnn has no pretrained weights; set backbone_weights to null")
        features = _small_cnn(inputs, config.backbone_widths)
    else:
        model = _applications_model(config.backbone, inputs, config.backbone_weights)
        features = _pyramid_from_model(model, size)
    return keras.Model(inputs, features, name=f"{config.backbone}_backbone")
