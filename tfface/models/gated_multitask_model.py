"""Gated multi-task CNN (Celona, Bianco, Schettini, Sensors 2018, "MTL-CNN").

One fully shared backbone; per-task gates (or a per-task mixture of shared
experts, `gate: mixture_of_experts`) route the pooled activations into
per-task embeddings; one linear head per task; a correlation layer refines
all predictions from the others; a center loss clusters each task's
embeddings by class value. See docs/design.md for the choices the paper
leaves open.
"""

import keras
import numpy as np

from tfface.config import ConfigError
from tfface.layers.center_loss import CenterLoss
from tfface.layers.correlation_refinement import CorrelationRefinement
from tfface.layers.expert_routing import ExpertRouting
from tfface.layers.task_gate import TaskGate
from tfface.layers.task_heads import TaskHeads
from tfface.models.backbones import build_backbone
from tfface.models.multitask_model import MultiTaskFaceModel
from tfface.models.multitask_model import logit_blocks
from tfface.models.multitask_model import output_sizes
from tfface.models.multitask_model import task_outputs


@keras.saving.register_keras_serializable(package="tfface")
class GatedMultiTaskModel(MultiTaskFaceModel):
    """Example:

    ```python
    import tfface
    model = tfface.models.GatedMultiTaskModel(
        schema=tfface.schema.get_schema("fused"),
        config=tfface.config.ModelConfig(image_size=64, gate="static"),
    )
    # or a named architecture (tfface.presets):
    model = tfface.models.GatedMultiTaskModel.from_preset("gated_small_cnn_64", "fused")
    model.compile()
    model.fit(train_ds, validation_data=val_ds, epochs=5)
    ```
    """

    model_type = "gated"

    def __init__(self, schema=None, config=None, train_labels=None, restoring=False, frozen_layers=(), **kwargs):
        """`train_labels` (task name -> training labels, -1 where missing)
        start the correlation layer when the config asks for
        `correlation_init: label_correlation`."""
        super().__init__(schema=schema, config=config, **kwargs)  # layers are frozen last: center_loss is made below
        if self.model_config.correlation and self.model_config.correlation_init == "label_correlation":
            if train_labels is not None:
                self.init_correlation_from_labels(train_labels)
            elif not restoring:  # a loaded model gets the layer's weights from its file
                raise ConfigError(
                    "model.correlation_init 'label_correlation' needs the training labels to start the correlation "
                    "layer: pass train_labels= (task name -> labels, e.g. "
                    "tfface.training.trainer.training_labels(schema, sources)), or use correlation_init='identity'"
                )
        self.center_loss = CenterLoss(
            [2 if t.is_binary else t.num_classes for t in self.schema],
            weight=self.model_config.center_loss_weight,
            update_rate=self.model_config.center_update_rate,
            name="center_loss",
            dtype="float32",  # a loss: float32 also under mixed precision
        )
        self.center_loss.build((None, len(self.schema), self.model_config.embedding_dim))
        # Without the loss the centers are never read: a frozen layer skips
        # their update rule in `call` (they are not the optimizer's).
        self.center_loss.trainable = self.model_config.center_loss_weight > 0
        self._freeze_layers(frozen_layers)

    def build_graph(self, schema, config):
        # === Layers and functional model ===
        image = keras.Input((config.image_size, config.image_size, 3), name="image")
        features = build_backbone(config)(image)["P5"]
        pooled = keras.layers.GlobalAveragePooling2D(name="pool")(features)
        if config.gate_bottleneck:
            # The gated tensor is (B, K, C) and the projection costs B*K*C*E:
            # a shared bottleneck makes C small whatever the backbone's width.
            pooled = keras.layers.Dense(config.gate_bottleneck, name="gate_bottleneck")(pooled)
            pooled = keras.layers.BatchNormalization(name="gate_bottleneck_bn")(pooled)
            pooled = keras.layers.ReLU(name="gate_bottleneck_relu")(pooled)
        if config.gate == "mixture_of_experts":
            # Experts and router replace the gate and the shared projection.
            routing = ExpertRouting(
                len(schema), num_experts=config.num_experts, units=config.embedding_dim, name="expert_routing"
            )
            embeddings = keras.layers.Identity(name="embeddings")(routing(pooled))
        else:
            embeddings = self._gated_embeddings(schema, config, pooled)
        dropped = keras.layers.Dropout(config.dropout, name="dropout")(embeddings)
        raw_logits = TaskHeads(output_sizes(schema), name="task_heads")(dropped)
        outputs = {}
        if config.correlation:
            logits = CorrelationRefinement(output_sizes(schema), name="correlation")(raw_logits)
            outputs["_raw_logits"] = raw_logits
        else:
            logits = raw_logits
        outputs.update(task_outputs(schema, logits))
        outputs["_logits"] = logits
        outputs["_embeddings"] = embeddings
        return {"image": image}, outputs

    @staticmethod
    def _gated_embeddings(schema, config, pooled):
        """Per-task embeddings (B, K, D) through the channel gates (or none)."""
        gate = TaskGate(
            len(schema),
            gate_type=config.gate,
            gate_init=config.gate_init,
            hidden_units=config.gate_hidden,
            name="task_gate",
        )
        # Shared projection P, BN and ReLU: the same for every task's view,
        # e_k = relu(bn(P(g_k * f))).
        projection = keras.layers.Dense(config.embedding_dim, name="shared_projection")
        normalization = keras.layers.BatchNormalization(name="projection_bn")
        if config.gate == "none":
            # Every task sees f, so e_k is the same for all k: project once
            # and repeat (K times less work than projecting K copies of f).
            shared = keras.layers.ReLU(name="shared_embedding")(normalization(projection(pooled)))
            return keras.layers.Identity(name="embeddings")(gate(shared))
        return keras.layers.ReLU(name="embeddings")(normalization(projection(gate(pooled))))

    def init_correlation_from_labels(self, labels, scale=None):
        """Starts the correlation layer from label co-occurrence.

        Args:
            labels: task name -> (N,) labels with -1 where missing, as
                `Schema.encode_labels` gives them (binary tasks are used).
            scale: multiplies the phi coefficients (default: the config's
                `correlation_init_scale`).
        """
        if not self.model_config.correlation:
            raise ValueError("this model has no correlation layer (model.correlation is false)")
        blocks = logit_blocks(self.schema)
        rows = len(next(iter(labels.values())))
        matrix = np.full((rows, blocks[-1][1]), np.nan)
        for task, (start, _) in zip(self.schema, blocks):
            if task.is_binary and task.name in labels:
                values = np.asarray(labels[task.name], np.float64)
                matrix[:, start] = np.where(values < 0, np.nan, values)
        scale = self.model_config.correlation_init_scale if scale is None else scale
        self.get_layer("correlation").set_from_label_correlation(matrix, scale=scale)
