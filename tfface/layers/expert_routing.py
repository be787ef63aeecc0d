"""Mixture-of-experts routing of a shared feature into per-task embeddings.

MMoE routing (Ma et al. KDD 2018; docs/design.md): E shared experts
(Dense + BN + ReLU each) read the pooled feature once, and each task takes
its own softmax mixture of them, e_k = sum_e pi_ke E_e(f) with
pi_k = softmax(U_k f). It routes like a gate, but the per-task work is a
mixture of E small vectors (B*K*E*D multiply-adds) instead of projecting K
gated copies of the feature (B*K*C*D for the channel gates), so it does not
grow with the backbone's width (docs/results.md, "Cost of the multi-task
heads").
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="tfface")
class ExpertRouting(keras.layers.Layer):
    """Pooled feature (B, C) -> per-task embeddings (B, K, D).

    Args:
        num_tasks: K.
        num_experts: E, shared experts every task mixes.
        units: D, the width of each expert (the embedding size).
    """

    def __init__(self, num_tasks, num_experts=4, units=128, **kwargs):
        super().__init__(**kwargs)
        if int(num_experts) < 2:
            raise ValueError(f"ExpertRouting needs at least 2 experts to route between, got {num_experts}")
        self.num_tasks = int(num_tasks)
        self.num_experts = int(num_experts)
        self.units = int(units)

    def build(self, input_shape):
        # One Dense for all experts; each expert's BN channels are its own.
        self.experts = keras.layers.Dense(self.num_experts * self.units, name="experts")
        self.experts.build(input_shape)
        self.experts_bn = keras.layers.BatchNormalization(name="experts_bn")
        self.experts_bn.build((None, self.num_experts * self.units))
        # Router logits U_k f for every task at once. Zero kernel: every task
        # starts with the even mixture, as the channel gates start equal.
        self.router = keras.layers.Dense(self.num_tasks * self.num_experts, kernel_initializer="zeros", name="router")
        self.router.build(input_shape)

    def routing_weights(self, features):
        """The mixture weights pi (B, K, E); each row sums to 1."""
        logits = ops.reshape(self.router(features), (-1, self.num_tasks, self.num_experts))
        return ops.softmax(logits, axis=-1)

    def call(self, features, training=None):
        experts = ops.relu(self.experts_bn(self.experts(features), training=training))
        experts = ops.reshape(experts, (-1, self.num_experts, self.units))
        return ops.matmul(self.routing_weights(features), experts)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_tasks, self.units)

    def get_config(self):
        config = super().get_config()
        config.update(num_tasks=self.num_tasks, num_experts=self.num_experts, units=self.units)
        return config
