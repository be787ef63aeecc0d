"""Adaptive Mask Learning (AML) of MGMTN: a small UNet that predicts masks.

MGMTN draws face-part masks from landmarks only to *train* a UNet; at
inference the UNet predicts the masks from the image, so no landmark
detector is needed. Here the masks come at a quarter of the input
resolution, which is what the data pipeline draws (`y["_group_masks"]`,
(B, S/4, S/4, 8) in `tfface.schema.GROUPS` order) and finer than every
pyramid level they pool (strides 8, 16, 32).

Training schedule of the paper: train the predictor alone on the landmark
masks (`pretrain_mask_predictor`), then freeze it
(`ModelConfig.mask_trainable=False`) while the attribute network trains.
Or leave it trainable and let the model's mask loss (weight
`ModelConfig.mask_loss_weight`) train it jointly.
"""

from __future__ import annotations

import dataclasses

import keras
from keras import layers
from keras import ops

from tfface.losses import masked_bce_dice
from tfface.schema import GROUPS

MASK_STRIDE = 4
# Faster than Keras' 0.99 so that a short stage-1 run (a few hundred steps)
# already leaves usable inference statistics.
BN_MOMENTUM = 0.9


def _conv_bn_relu(x, filters, stride, name):
    x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def build_mask_predictor(image_size, channels=(16, 32, 64), num_groups=len(GROUPS), name="mask_predictor"):
    """UNet: image (B, S, S, 3) float 0..255 -> masks (B, S/4, S/4, G) in [0, 1].

    Encoder: a 4x4 stride-4 patch stem (masks are only needed at S/4, so no
    full-resolution convs), one conv at stride 4, then one stride-2 level
    (two convs) per further entry of `channels` (strides 8, 16, ...).
    Decoder (LinkNet-style skips, which keep it cheap): 1x1 conv down to the
    skip's width, bilinear 2x upsampling, add the encoder map of the same
    stride, one 3x3 conv; then one sigmoid channel per group. With the
    default widths it takes about 0.35-0.5x the CPU latency of the default
    `small_cnn` (64-128 px, batch 32).

    Args:
        image_size: S; must be divisible by 4 * 2 ** (len(channels) - 1).
        channels: encoder widths from stride 4 down (at least 2 levels).
        num_groups: output masks (the eight MGMTN groups by default).
    """
    channels = tuple(int(c) for c in channels)
    if len(channels) < 2 or min(channels) < 1:
        raise ValueError(f"mask predictor channels need >= 2 positive widths, got {list(channels)}")
    deepest = MASK_STRIDE * 2 ** (len(channels) - 1)
    if int(image_size) % deepest:
        raise ValueError(
            f"mask predictor with {len(channels)} levels needs image_size divisible by {deepest}, "
            f"got {image_size}"
        )
    if int(num_groups) < 1:
        raise ValueError(f"num_groups must be positive, got {num_groups}")
    # Built under its own name scope: the variable paths ("mask_predictor/
    # stem_conv/kernel") must not repeat the backbone's ("stem_conv/kernel"),
    # or `get_state_tree` and path-keyed tools fail on the mask-guided model.
    with keras.name_scope(name):
        image = keras.Input((image_size, image_size, 3), name="image")
        x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="normalize")(image)
        x = layers.Conv2D(channels[0], MASK_STRIDE, strides=MASK_STRIDE, use_bias=False, name="stem_conv")(x)
        x = layers.BatchNormalization(momentum=BN_MOMENTUM, name="stem_bn")(x)
        x = layers.ReLU(name="stem_relu")(x)
        x = _conv_bn_relu(x, channels[0], 1, "down0")
        skips = [x]
        for i, width in enumerate(channels[1:], start=1):
            x = _conv_bn_relu(x, width, 2, f"down{i}_a")
            x = _conv_bn_relu(x, width, 1, f"down{i}_b")
            skips.append(x)
        for i in range(len(channels) - 2, -1, -1):
            x = layers.Conv2D(channels[i], 1, use_bias=False, name=f"up{i}_reduce")(x)
            x = layers.UpSampling2D(2, interpolation="bilinear", name=f"up{i}_resize")(x)
            x = layers.Add(name=f"up{i}_skip")([x, skips[i]])
            x = _conv_bn_relu(x, channels[i], 1, f"up{i}")
        masks = layers.Conv2D(num_groups, 1, name="mask_logits")(x)
        masks = layers.Activation("sigmoid", dtype="float32", name="masks")(masks)
        model = keras.Model(image, masks, name=name)
    return model


def mask_iou(masks_true, masks_pred, valid=None, threshold=0.5):
    """Mean IoU over groups and valid examples of masks binarised at `threshold`.

    masks (B, H, W, G); valid (B,) 1 where the example has true masks. A
    group empty in both truth and prediction counts as IoU 1.
    """
    truth = ops.cast(ops.convert_to_tensor(masks_true) >= threshold, "float32")
    pred = ops.cast(ops.convert_to_tensor(masks_pred) >= threshold, "float32")
    intersection = ops.sum(truth * pred, axis=(1, 2))
    union = ops.sum(ops.maximum(truth, pred), axis=(1, 2))
    iou = ops.mean(ops.where(union > 0, intersection / ops.maximum(union, 1.0), 1.0), axis=-1)
    if valid is None:
        return ops.mean(iou)
    valid = ops.cast(ops.reshape(valid, (-1,)), "float32")
    return ops.sum(iou * valid) / ops.maximum(ops.sum(valid), 1.0)


class MaskPredictorTrainer(keras.Model):
    """Trains a mask predictor alone on the attribute-model dataset.

    Reads the same batches as the attribute models, (x={"image", ...},
    y={..., "_group_masks", "_has_landmarks"}), and minimises BCE + Dice
    over the examples that have landmarks. It shares the predictor's
    weights; it is a training wrapper and is not meant to be saved.
    """

    def __init__(self, predictor, **kwargs):
        size = predictor.input_shape[1]
        image = keras.Input((size, size, 3), name="image")
        super().__init__(inputs={"image": image}, outputs=predictor(image), **kwargs)
        self.predictor = predictor
        self.iou_tracker = keras.metrics.Mean(name="mask_iou")

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        del x, sample_weight
        if not isinstance(y, dict) or "_group_masks" not in y:
            raise ValueError(
                "training the mask predictor needs labels with '_group_masks' "
                "(build the dataset with DataConfig.with_masks=True)"
            )
        return masked_bce_dice(y["_group_masks"], y_pred, _valid(y))

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        self.iou_tracker.update_state(mask_iou(y["_group_masks"], y_pred, _valid(y)))
        return self.get_metrics_result()


def _valid(y):
    return y.get("_has_landmarks", ops.ones((ops.shape(y["_group_masks"])[0],)))


def pretrain_mask_predictor(
    model,
    dataset,
    epochs=1,
    learning_rate=1e-3,
    steps_per_epoch=None,
    validation_data=None,
    freeze=True,
    verbose="auto",
    callbacks=None,
):
    """Stage 1 of MGMTN: trains the mask predictor alone, then freezes it.

    Args:
        model: a `MaskGuidedMultiTaskModel` (its "mask_predictor" layer is
            trained) or a model from `build_mask_predictor`.
        dataset: batches (x={"image": ...}, y={"_group_masks": ...,
            "_has_landmarks": ...}); task labels in y are ignored.
        freeze: afterwards mark the predictor non-trainable (and set the
            model's `mask_trainable` to False so saved models keep it
            frozen). Compile the attribute model after this call.

    Returns:
        The `keras.callbacks.History` of the predictor's training
        (metrics "loss" and "mask_iou").
    """
    predictor = _find_predictor(model)
    was_trainable = predictor.trainable
    predictor.trainable = True
    trainer = MaskPredictorTrainer(predictor, name="mask_predictor_trainer")
    trainer.compile(optimizer=keras.optimizers.Adam(learning_rate))
    history = trainer.fit(
        dataset,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        validation_data=validation_data,
        shuffle=False,  # a dataset shuffles itself
        verbose=verbose,
        callbacks=callbacks,
    )
    if all(loss == 0.0 for loss in history.history.get("loss", [])):
        # The masked loss is exactly 0 only when no image had landmarks:
        # nothing was learned, and freezing would keep random masks.
        predictor.trainable = was_trainable
        raise ValueError(
            "no training image had landmarks (y['_has_landmarks'] was 0 for every one), so the mask predictor "
            "learned nothing and was left as it was, not frozen: detect landmarks first (tfface data annotate "
            "SOURCE) and build the dataset with with_masks=True"
        )
    predictor.trainable = was_trainable and not freeze
    if freeze and hasattr(model, "model_config"):
        model.model_config = dataclasses.replace(model.model_config, mask_trainable=False)
    return history


def _find_predictor(model):
    try:
        return model.get_layer("mask_predictor")
    except ValueError:
        pass
    if isinstance(model.output_shape, tuple) and len(model.output_shape) == 4:
        return model  # a predictor itself
    raise ValueError(
        f"model {model.name!r} has no 'mask_predictor' layer (fusion='global' models have none)"
    )
