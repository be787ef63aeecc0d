"""Group-Global Feature Fusion (G2FF) of MGMTN, as one batched op.

A group feature sees only its face region; some of its attributes still need
context (Smiling reads the cheeks as well as the mouth, Earrings needs to
know where the face is). So each group mixes its own feature with the global
one through its own linear map: h_j = W_j [G_j; u] + b_j (docs/design.md; the
paper's exact operator was not retrievable). The nonlinearity, batch norm
and dropout follow outside the layer.
"""

import keras
from keras import ops

FUSION_TYPES = ("global", "group", "group_global")


@keras.saving.register_keras_serializable(package="tfface")
class GroupGlobalFusion(keras.layers.Layer):
    """Per-group linear fusion -> (B, G, units).

    Inputs by `fusion`:
        "group_global": [group features (B, G, Dg), global feature (B, Du)];
        "group": group features (B, G, Dg) alone;
        "global": global feature (B, Du) alone (the global-only baseline:
            every group gets its own projection of the same global feature).

    Concatenate-then-Dense is computed as two matmuls, W_j = [A_j, B_j]:
    h_j = A_j G_j + B_j u + b_j, with B u done once for all groups.

    Args:
        num_groups: G.
        units: width of each fused group feature.
        fusion: one of `FUSION_TYPES`.
    """

    def __init__(self, num_groups, units, fusion="group_global", **kwargs):
        super().__init__(**kwargs)
        if fusion not in FUSION_TYPES:
            raise ValueError(f"fusion must be one of {FUSION_TYPES}, got {fusion!r}")
        self.num_groups = int(num_groups)
        self.units = int(units)
        self.fusion = fusion

    def _split_shapes(self, input_shape):
        if self.fusion == "group_global":
            if not isinstance(input_shape, (list, tuple)) or len(input_shape) != 2 or not isinstance(
                input_shape[0], (list, tuple)
            ):
                raise ValueError("fusion 'group_global' takes [group_features, global_feature]")
            return tuple(input_shape[0]), tuple(input_shape[1])
        if self.fusion == "group":
            return tuple(input_shape), None
        return None, tuple(input_shape)

    def build(self, input_shape):
        group_shape, global_shape = self._split_shapes(input_shape)
        if group_shape is not None:
            if len(group_shape) != 3 or group_shape[1] != self.num_groups:
                raise ValueError(
                    f"group features must be (B, {self.num_groups}, D), got {group_shape}"
                )
            self.group_kernel = self.add_weight(
                name="group_kernel",
                shape=(self.num_groups, int(group_shape[2]), self.units),
                initializer="glorot_uniform",
            )
        if global_shape is not None:
            if len(global_shape) != 2:
                raise ValueError(f"the global feature must be (B, D), got {global_shape}")
            self.global_kernel = self.add_weight(
                name="global_kernel",
                shape=(int(global_shape[1]), self.num_groups * self.units),
                initializer="glorot_uniform",
            )
        self.bias = self.add_weight(
            name="bias", shape=(self.num_groups, self.units), initializer="zeros"
        )

    def call(self, inputs):
        if self.fusion == "group_global":
            group_features, global_feature = inputs
        elif self.fusion == "group":
            group_features, global_feature = inputs, None
        else:
            group_features, global_feature = None, inputs
        fused = ops.cast(self.bias, self.compute_dtype)[None]
        if group_features is not None:
            kernel = ops.cast(self.group_kernel, group_features.dtype)
            fused = fused + ops.einsum("bgd,gdu->bgu", group_features, kernel)
        if global_feature is not None:
            kernel = ops.cast(self.global_kernel, global_feature.dtype)
            projected = ops.matmul(global_feature, kernel)
            fused = fused + ops.reshape(projected, (-1, self.num_groups, self.units))
        return fused

    def compute_output_shape(self, input_shape):
        group_shape, global_shape = self._split_shapes(input_shape)
        batch = (group_shape or global_shape)[0]
        return (batch, self.num_groups, self.units)

    def get_config(self):
        config = super().get_config()
        config.update(num_groups=self.num_groups, units=self.units, fusion=self.fusion)
        return config
