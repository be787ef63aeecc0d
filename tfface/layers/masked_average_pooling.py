"""Average pooling of a feature map under soft part masks (MGMTN groups).

MGMTN restricts each attribute group to its face region: a group's feature
is the feature map averaged over that group's mask, so a mouth attribute is
read from mouth pixels only. The masks come at their own resolution (the
mask predictor's S/4) and are resized to each pyramid level first.
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="tfface")
class MaskedAveragePooling(keras.layers.Layer):
    """[features (B, h, w, C), masks (B, H, W, G)] -> (B, G, C).

    g_j = sum_hw P_j F / (sum_hw P_j + epsilon), with P the masks resized to
    (h, w). When (H, W) is an integer multiple of (h, w) the resize is an
    exact area average (block mean), so the pooled feature of a mask does not
    depend on how the masks were sampled; otherwise it is an antialiased
    bilinear resize. Both commute with horizontal flips. An empty mask gives a
    zero feature.

    Args:
        epsilon: keeps the division finite for empty masks.
    """

    def __init__(self, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        if not isinstance(input_shape, (list, tuple)) or len(input_shape) != 2:
            raise ValueError("MaskedAveragePooling takes a list [features, masks]")
        features_shape, masks_shape = input_shape
        if len(features_shape) != 4 or len(masks_shape) != 4:
            raise ValueError(
                f"MaskedAveragePooling needs features (B, h, w, C) and masks (B, H, W, G), "
                f"got {tuple(features_shape)} and {tuple(masks_shape)}"
            )

    def resize_masks(self, masks, height, width):
        """Masks (B, H, W, G) at the feature resolution (B, h, w, G)."""
        mask_height, mask_width = masks.shape[1], masks.shape[2]
        static = None not in (mask_height, mask_width, height, width)
        if static and (mask_height, mask_width) == (height, width):
            return masks
        if static and mask_height % height == 0 and mask_width % width == 0:
            fy, fx = mask_height // height, mask_width // width
            blocks = ops.reshape(masks, (-1, height, fy, width, fx, masks.shape[3]))
            return ops.mean(blocks, axis=(2, 4))
        return ops.image.resize(masks, (height, width), interpolation="bilinear", antialias=True)

    def call(self, inputs):
        features, masks = inputs
        masks = ops.cast(masks, "float32")
        height, width = features.shape[1], features.shape[2]
        if height is None or width is None:
            height, width = ops.shape(features)[1], ops.shape(features)[2]
        masks = self.resize_masks(masks, height, width)
        # float32 sums: under mixed precision small masks would underflow.
        weighted = ops.einsum("bhwg,bhwc->bgc", masks, ops.cast(features, "float32"))
        area = ops.sum(masks, axis=(1, 2))[:, :, None]
        pooled = weighted / (area + self.epsilon)
        return ops.cast(pooled, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        features_shape, masks_shape = input_shape
        return (features_shape[0], masks_shape[-1], features_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(epsilon=self.epsilon)
        return config
