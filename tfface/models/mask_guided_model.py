"""Mask-guided multi-task network (Gao et al., IJMLC 2026, "MGMTN").

Each attribute group reads only its face region: a UNet predicts one soft
mask per group (Adaptive Mask Learning), the backbone's P3/P4/P5 maps are
average-pooled under each mask, and each group fuses its pooled feature with
a global one (Group-Global Feature Fusion) before its tasks' heads. See
docs/design.md for the choices the paper leaves open.

Feature widths, with D = `ModelConfig.embedding_dim` (the paper-sized
setting is D = 512): each scale's pooled feature is projected to D/2 (shared over
groups), so a group feature has 3D/2; the global feature has D; the fused
group feature has D.

Ablations (all `ModelConfig` fields):
* `fusion`: "group_global" (default), "group" (masked features only),
  "global" (global-only baseline: no masks, no mask predictor; every group
  gets its own projection of the same global feature).
* `use_landmark_masks`: pool under masks drawn from landmarks, given as a
  second input "group_masks" (B, S/4, S/4, 8), instead of the predicted
  ones. The predictor stays in the model (and still outputs
  `_group_masks`), so both variants have the same weights:
  `landmark_mask_variant(model)` turns a trained model into the other.
* `mask_trainable`: False freezes the predictor (after
  `tfface.models.mask_predictor.pretrain_mask_predictor`, which
  `tfface train` runs for `train.mask_pretrain_epochs`). A model built
  with False keeps its untrained predictor until that call: `tfface train`
  refuses such a config without pretraining; from Python, call it yourself.
* `use_landmark_masks` models take the masks as a second input, so
  `predict_tasks` and the SavedModel export (one image input) refuse them;
  use `model.predict({"image": ..., "group_masks": ...})` or
  `tfface.predict.predict_faces`.
"""

import dataclasses
import warnings

import keras
from keras import layers

from tfface.config import ConfigError
from tfface.config import ModelConfig
from tfface.layers.group_global_fusion import GroupGlobalFusion
from tfface.layers.masked_average_pooling import MaskedAveragePooling
from tfface.layers.task_group_selector import TaskGroupSelector
from tfface.layers.task_heads import TaskHeads
from tfface.models.backbones import build_backbone
from tfface.models.mask_predictor import MASK_STRIDE
from tfface.models.mask_predictor import build_mask_predictor
from tfface.models.multitask_model import MultiTaskFaceModel
from tfface.models.multitask_model import output_sizes
from tfface.models.multitask_model import task_outputs
from tfface.schema import GROUPS

PYRAMID_LEVELS = ("P3", "P4", "P5")


def _dense_bn_relu(x, units, name):
    x = layers.Dense(units, use_bias=False, name=f"{name}_dense")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


@keras.saving.register_keras_serializable(package="tfface")
class MaskGuidedMultiTaskModel(MultiTaskFaceModel):
    """Example:

    ```python
    import tfface
    from tfface.models.mask_predictor import pretrain_mask_predictor

    config = tfface.config.ModelConfig(type="mask_guided", image_size=64)
    model = tfface.models.MaskGuidedMultiTaskModel(
        schema=tfface.schema.get_schema("fused"), config=config
    )
    # Optional stage 1 (the paper's schedule): masks alone, then frozen.
    pretrain_mask_predictor(model, train_ds, epochs=2)
    model.compile()
    model.fit(train_ds, validation_data=val_ds, epochs=5)
    ```

    Batches need `y["_group_masks"]` and `y["_has_landmarks"]`
    (`DataConfig.with_masks=True`) for the mask loss; without them the
    predictor gets no mask supervision.
    """

    model_type = "mask_guided"

    # ModelConfig fields only the gated model reads (docs/design.md).
    GATED_OPTIONS = (
        "gate", "gate_init", "gate_hidden", "correlation", "correlation_init", "correlation_init_scale",
        "center_loss_weight", "center_update_rate",
    )

    def __init__(self, schema=None, config=None, restoring=False, **kwargs):
        super().__init__(schema=schema, config=config, **kwargs)
        defaults = ModelConfig()
        ignored = [key for key in self.GATED_OPTIONS if getattr(self.model_config, key) != getattr(defaults, key)]
        if ignored and not restoring:
            warnings.warn(
                f"model.{', model.'.join(ignored)}: options of the gated model, which the mask-guided model "
                "does not read (it routes by face-part masks: model.fusion, model.mask_*)"
            )

    def build_graph(self, schema, config):
        if config.use_landmark_masks and config.fusion == "global":
            raise ConfigError("model.use_landmark_masks needs model.fusion 'group' or 'group_global'")
        size = config.image_size
        num_groups = len(GROUPS)
        dim = config.embedding_dim
        image = keras.Input((size, size, 3), name="image")
        inputs = {"image": image}
        outputs = {}
        features = build_backbone(config)(image)

        # === Global feature u = Dense(GAP(P5)) ===
        global_feature = None
        if config.fusion in ("global", "group_global"):
            pooled = layers.GlobalAveragePooling2D(name="global_pool")(features["P5"])
            global_feature = layers.Dense(dim, name="global_projection")(pooled)

        # === Adaptive Mask Learning + masked group features G_j ===
        group_features = None
        if config.fusion in ("group", "group_global"):
            predictor = build_mask_predictor(size, config.mask_channels, num_groups)
            predictor.trainable = config.mask_trainable
            predicted = predictor(image)
            outputs["_group_masks"] = predicted
            masks = predicted
            if config.use_landmark_masks:
                masks = keras.Input(
                    (size // MASK_STRIDE, size // MASK_STRIDE, num_groups), name="group_masks"
                )
                inputs["group_masks"] = masks
            per_scale = []
            for level in PYRAMID_LEVELS:
                pooled = MaskedAveragePooling(name=f"{level}_masked_pool")([features[level], masks])
                # phi_i: one projection per scale, shared by the groups.
                per_scale.append(_dense_bn_relu(pooled, max(dim // 2, 1), f"{level}_group_projection"))
            group_features = layers.Concatenate(name="group_features")(per_scale)

        # === Group-Global Feature Fusion ===
        fusion = GroupGlobalFusion(num_groups, dim, fusion=config.fusion, name="group_global_fusion")
        if config.fusion == "group_global":
            fused = fusion([group_features, global_feature])
        elif config.fusion == "group":
            fused = fusion(group_features)
        else:
            fused = fusion(global_feature)
        fused = layers.BatchNormalization(name="fusion_bn")(fused)
        fused = layers.ReLU(name="fusion_relu")(fused)

        # === Heads: each task reads its group's feature ===
        task_groups = [GROUPS.index(task.group) for task in schema]
        embeddings = TaskGroupSelector(task_groups, name="embeddings")(fused)
        dropped = layers.Dropout(config.dropout, name="dropout")(embeddings)
        logits = TaskHeads(output_sizes(schema), name="task_heads")(dropped)
        outputs.update(task_outputs(schema, logits))
        outputs["_logits"] = logits
        outputs["_embeddings"] = embeddings
        return inputs, outputs


def landmark_mask_variant(model, use_landmark_masks=True):
    """The same trained model with `use_landmark_masks` switched.

    Both variants hold the same layers with the same weights (the predictor
    is kept in both), so this is a rebuild plus a copy layer by layer; the
    returned model is compiled with the defaults.
    """
    if not isinstance(model, MaskGuidedMultiTaskModel):
        raise TypeError(f"expected a MaskGuidedMultiTaskModel, got {type(model).__name__}")
    config = dataclasses.replace(model.model_config, use_landmark_masks=bool(use_landmark_masks))
    variant = MaskGuidedMultiTaskModel(schema=model.schema, config=config)
    for layer in model.layers:
        if layer.weights:
            variant.get_layer(layer.name).set_weights(layer.get_weights())
    variant.compile()
    return variant
