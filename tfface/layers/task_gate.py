"""Per-task gates that route shared backbone activations (Celona et al. 2018).

The backbone is fully shared; each task gets its own view of the pooled
feature `f` through a channel gate `g_k`, so tasks can pick the channels they
need without task-specific convolution branches (few extra parameters).
"""

import keras
from keras import ops

# model.gate's "mixture_of_experts" is not a gate of this layer: it routes
# through ExpertRouting (expert_routing.py) instead.
TASK_GATE_TYPES = ("none", "static", "input_conditioned")


@keras.saving.register_keras_serializable(package="tfface")
class TaskGate(keras.layers.Layer):
    """Gates a pooled feature once per task: (B, C) -> (B, K, C).

    Args:
        num_tasks: K, the number of gated embeddings (tasks).
        gate_type: "none" (baseline: every task sees `f`), "static"
            (`g_k = sigmoid(a_k)`, learnable per task), or
            "input_conditioned" (`g_k = sigmoid(W2 relu(W1 f) + a_k)`,
            SE-style with shared W1, W2 and a per-task offset `a_k`).
        gate_init: initial value of `a_k`; 2.0 opens gates to ~0.88.
        hidden_units: width of W1 for the input-conditioned gate.
    """

    def __init__(self, num_tasks, gate_type="static", gate_init=2.0, hidden_units=64, **kwargs):
        super().__init__(**kwargs)
        if gate_type not in TASK_GATE_TYPES:
            raise ValueError(f"gate_type must be one of {TASK_GATE_TYPES}, got {gate_type!r}")
        self.num_tasks = int(num_tasks)
        self.gate_type = gate_type
        self.gate_init = float(gate_init)
        self.hidden_units = int(hidden_units)

    def build(self, input_shape):
        channels = int(input_shape[-1])
        if self.gate_type == "none":
            return
        self.task_offsets = self.add_weight(
            name="task_offsets",
            shape=(self.num_tasks, channels),
            initializer=keras.initializers.Constant(self.gate_init),
        )
        if self.gate_type == "input_conditioned":
            self.squeeze = keras.layers.Dense(self.hidden_units, activation="relu", name="squeeze")
            self.squeeze.build(input_shape)
            self.excite = keras.layers.Dense(
                channels, kernel_initializer="zeros", use_bias=False, name="excite"
            )
            self.excite.build((None, self.hidden_units))

    def _gate_values(self, features):
        """Gates broadcastable to (B, K, C): (1, K, C) for static gates (no
        per-example copy), (B, K, C) for input-conditioned ones; None for
        "none"."""
        if self.gate_type == "none":
            return None
        logits = ops.expand_dims(self.task_offsets, 0)
        if self.gate_type == "input_conditioned":
            logits = logits + ops.expand_dims(self.excite(self.squeeze(features)), 1)
        return ops.sigmoid(ops.cast(logits, features.dtype))

    def gates(self, features):
        """The gate values (B, K, C) in [0, 1] (ones for "none")."""
        shape = (ops.shape(features)[0], self.num_tasks, ops.shape(features)[-1])
        values = self._gate_values(features)
        return ops.ones(shape, features.dtype) if values is None else ops.broadcast_to(values, shape)

    def call(self, features):
        expanded = ops.expand_dims(features, 1)  # (B, 1, C)
        values = self._gate_values(features)
        if values is None:
            return ops.repeat(expanded, self.num_tasks, axis=1)
        return values * expanded

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_tasks, input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(
            num_tasks=self.num_tasks,
            gate_type=self.gate_type,
            gate_init=self.gate_init,
            hidden_units=self.hidden_units,
        )
        return config
