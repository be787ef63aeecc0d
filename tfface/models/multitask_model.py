"""`MultiTaskFaceModel`: what every tfface model shares.

A functional Keras model with one input, `image` (B, S, S, 3) float 0..255,
and a dict output: one entry per task of the schema (binary: (B,)
probability of the positive class; multiclass: (B, C) probabilities), plus
training-only entries whose names start with "_" (`_logits`,
`_raw_logits`, `_embeddings`, `_group_masks`). Exports and predictions use
the public entries only.

The losses live in `compute_loss` rather than `compile(loss=...)` because
they need several outputs at once (deep supervision on raw and refined
logits, the center loss on embeddings, the mask loss) and must skip missing
labels. So `model.compile()` + `model.fit(dataset)` is all a user writes.
Labels are a dict keyed by task name with -1 for missing (see
`tfface.schema`); extra entries starting with "_" (`_group_masks`,
`_has_landmarks`) feed auxiliary losses.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import warnings
from collections.abc import Mapping

import keras
import numpy as np
from keras import ops

from tfface.config import LOSS_FAMILIES, ConfigError, ModelConfig, loss_family, model_config_from_dict
from tfface.losses import masked_bce_dice
from tfface.losses import masked_binary_crossentropy_columns
from tfface.losses import masked_sparse_categorical_crossentropy
from tfface.metrics import MultiTaskMetrics
from tfface.schema import Schema, get_schema


def output_sizes(schema: Schema) -> list[int]:
    """Logits per task: 1 for binary, C for multiclass."""
    return [1 if t.is_binary else t.num_classes for t in schema]


def logit_blocks(schema: Schema) -> list[tuple[int, int]]:
    starts = np.cumsum([0] + output_sizes(schema))
    return [(int(starts[i]), int(starts[i + 1])) for i in range(len(schema))]


def task_loss_weights(schema: Schema, loss_weights: dict) -> list[float]:
    """Per-task weights: an explicit per-task weight, else its family's
    (every task of a family gets the family weight; default 1, as in
    docs/design.md: normalising the 40 attributes by their count starved the
    shared backbone of attribute gradient and slowed learning)."""
    weights = []
    for task in schema:
        if task.name in loss_weights:
            weights.append(float(loss_weights[task.name]))
        else:
            weights.append(float(loss_weights.get(loss_family(task), 1.0)))
    return weights


def task_outputs(schema: Schema, logits) -> dict:
    """Public outputs from logits (B, M): sigmoid or softmax per task, float32.

    All binary tasks go through one sigmoid and one unstack: 40 small ops
    per task cost more than the heads themselves on a small CPU model.
    """
    logits = keras.ops.cast(logits, "float32")
    blocks = dict(zip(schema.task_names, logit_blocks(schema)))
    binary = schema.binary_tasks
    outputs = {}
    if binary:
        columns = keras.ops.take(logits, [blocks[t.name][0] for t in binary], axis=1)
        for task, probability in zip(binary, keras.ops.unstack(keras.ops.sigmoid(columns), axis=1)):
            outputs[task.name] = probability
    for task in schema.multiclass_tasks:
        start, end = blocks[task.name]
        outputs[task.name] = keras.ops.softmax(logits[:, start:end], axis=-1)
    return {name: outputs[name] for name in schema.task_names}


def _per_replica(loss):
    """The share of one replica in a synchronous `tf.distribute` step.

    Each replica's loss is the mean over its own batch; Keras sums the
    replicas' gradients and multiplies the logged loss back by their count,
    so, as Keras's own losses do, the loss is divided by that count here.
    Without it a two-worker run logged twice the loss and stepped on twice
    the gradient.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if replicas > 1:
            loss = loss / replicas
    return loss


# Packages a warning looks past to reach the user's line: tfface's own and
# those between a user's `fit` and a traced step.
_LIBRARY_PACKAGES = frozenset({"tfface", "keras", "tensorflow", "jax", "jaxlib", "optree", "contextlib", "functools"})


def user_stacklevel() -> int:
    """The `warnings.warn` stacklevel, for its caller, of the first frame
    outside tfface and the libraries tracing a step, so a warning names the
    user's line, not ours."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in _LIBRARY_PACKAGES:
        frame, level = frame.f_back, level + 1
    return level


def warn_if_unit_range(x) -> None:
    """Warns when in-memory images look scaled to 0..1: the models take
    0..255 and rescale inside, so such images would all read as near-black
    and every prediction would be wrong without any error."""
    image = x.get("image") if isinstance(x, Mapping) else x
    if not isinstance(image, np.ndarray) or image.size == 0 or not np.issubdtype(image.dtype, np.floating):
        return
    if 0.0 < float(np.max(image)) <= 1.0 and float(np.min(image)) >= -1.0:  # not an all-black batch
        warnings.warn(
            "images are in [-1, 1] (or [0, 1]) but tfface models take pixel values 0..255 and rescale them "
            "inside; multiply by 255 (tfface.data.image_ops.preprocess_image gives 0..255)",
            UserWarning,
            stacklevel=user_stacklevel(),
        )


def _layer_paths(layer, prefix="", frozen=False):
    """(path, layer, whether a parent is frozen) of every nested layer; paths
    ("mask_predictor/stem_conv") because nested models reuse layer names."""
    for sub in layer._layers:
        path = f"{prefix}{sub.name}"
        yield path, sub, frozen
        yield from _layer_paths(sub, path + "/", frozen or not sub.trainable)


# Labels of each sign, and no 0, before a binary task's -1/1 reads as
# CelebA's encoding rather than a chance draw of a few labels.
SIGN_ENCODED_MIN = 8

# `compile` arguments a `.keras` file keeps besides the optimizer.
_SAVED_COMPILE_SETTINGS = ("steps_per_execution", "jit_compile")


class MultiTaskFaceModel(keras.Model):
    """Base of the gated and mask-guided models. Subclasses build the graph
    in `build_graph(schema, config) -> (inputs, outputs)`."""

    def __init__(self, schema=None, config=None, restoring=False, frozen_layers=(), **kwargs):
        del restoring  # see from_config; subclasses that start weights from data read it
        if schema is not None:
            schema = get_schema(schema)  # a Schema, a preset name, a file or a dict; else a SchemaError
        if isinstance(config, dict):
            config = model_config_from_dict(config)
        elif isinstance(config, ModelConfig):
            # A copy: the model saves its config, and a caller who edits and
            # reuses theirs for another model must not change this one's.
            config = copy.deepcopy(config)
        elif config is not None:
            raise TypeError(
                f"config must be a tfface.config.ModelConfig or a dict of its fields, got {type(config).__name__}; "
                f"for a named architecture use {type(self).__name__}.from_preset(name, schema)"
            )
        config = config or ModelConfig(type=self.model_type or "gated")
        if schema is None:
            raise ValueError("a model needs a schema (tfface.schema.get_schema('fused'), ...)")
        config.validate()
        if self.model_type and config.type != self.model_type:
            raise ConfigError(
                f"model.type is {config.type!r} but {type(self).__name__} builds {self.model_type!r} models; "
                "tfface.models.build_model(schema, config) picks the class from the config"
            )
        unknown = sorted(set(config.loss_weights) - set(LOSS_FAMILIES) - set(schema.task_names))
        if unknown:
            raise ConfigError(f"model.loss_weights has unknown keys {unknown}: use task names or {LOSS_FAMILIES}")
        inputs, outputs = self.build_graph(schema, config)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.schema = schema
        self.model_config = config
        self.image_size = config.image_size
        self.task_weights = task_loss_weights(schema, config.loss_weights)
        self.attribute_metrics = MultiTaskMetrics(
            [(t.name, 2 if t.is_binary else t.num_classes, t.threshold, t.kind) for t in schema],
            name="attribute_metrics",
        )
        self._freeze_layers(frozen_layers)

    # The `ModelConfig.type` this class builds (set by subclasses).
    model_type: str = ""

    def build_graph(self, schema, config):  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def from_preset(cls, name, /, schema="fused", train_labels=None, **overrides):
        """A new model from a named architecture (`tfface.presets`), e.g.
        `GatedMultiTaskModel.from_preset("gated_small_cnn_64", "fused")`;
        `overrides` are ModelConfig fields, and `name=` the model's name."""
        from tfface.presets import from_preset

        return from_preset(name, schema, train_labels, model_class=cls, **overrides)

    # --- training -------------------------------------------------------------
    def compile(
        self, optimizer="auto", loss=None, loss_weights=None, metrics=None, weighted_metrics=None, *args,
        learning_rate=None, weight_decay=None, **kwargs,
    ):
        """`compile()` with no arguments gives AdamW (learning rate 2e-3,
        weight decay 1e-4) and the built-in masked losses and metrics.
        Keras's other arguments keep their places and meanings;
        `optimizer=None` compiles for evaluate and predict only."""
        refused = {
            "loss": (loss, "tfface models compute their own masked losses"),
            "loss_weights": (loss_weights, "per-task loss weights are ModelConfig.loss_weights (by task name or family)"),
            "metrics": (metrics, "tfface models report their own masked per-task metrics"),
            "weighted_metrics": (weighted_metrics, "tfface models report their own masked per-task metrics"),
        }
        for key, (value, why) in refused.items():
            if value is not None:
                raise ValueError(f"do not pass `{key}` to compile: {why}")
        if optimizer == "auto":
            optimizer = keras.optimizers.AdamW(
                learning_rate=2e-3 if learning_rate is None else learning_rate,
                weight_decay=1e-4 if weight_decay is None else weight_decay,
            )
        elif learning_rate is not None or weight_decay is not None:
            raise ValueError(
                "learning_rate and weight_decay set the default AdamW only; give them to your "
                "optimizer instead, e.g. compile(optimizer=keras.optimizers.SGD(learning_rate=0.01))"
            )
        super().compile(optimizer, None, None, None, None, *args, **kwargs)
        # What was asked for, not what "auto" resolved to on this machine:
        # a model saved on a CPU may be loaded on a GPU.
        given = {**dict(zip(("run_eagerly", "steps_per_execution", "jit_compile"), args)), **kwargs}
        self._compile_settings = {key: given[key] for key in _SAVED_COMPILE_SETTINGS if key in given}
        # Building now (the model itself is built at construction) saves a
        # second trace of the first train step.
        if self.optimizer is not None:
            self.optimizer.build(self.trainable_variables)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras 3.15's TF trainer fetches a batch and `strategy.reduce`s the
        # whole nested (x, y) structure here, which MultiWorkerMirrored-
        # Strategy cannot do. Nothing needs a symbolic build: the functional
        # graph is built at construction, losses and metrics are our own,
        # and `compile` builds the optimizer.
        if self.optimizer is not None and not self.optimizer.built:
            self.optimizer.build(self.trainable_variables)

    def build_from_config(self, config):
        """Nothing to do: the graph is built at construction. Keras's own
        version fails on the `{"input_shape": None}` a functional subclass
        records (KerasTuner calls it before loading a parent trial's weights
        when a resumed Hyperband search continues a trial)."""
        if not self.built:
            super().build_from_config(config)

    def get_compile_config(self):
        # Must be non-empty: Keras skips `compile_from_config` for a falsy one.
        if not self.compiled:
            return None
        return {
            "optimizer": keras.saving.serialize_keras_object(self.optimizer),
            **getattr(self, "_compile_settings", {}),
        }

    def compile_from_config(self, config):
        # The same optimizer (schedule included), built, so Keras restores
        # its saved state into matching variables.
        settings = {key: config[key] for key in _SAVED_COMPILE_SETTINGS if key in config}
        self.compile(optimizer=keras.saving.deserialize_keras_object(config["optimizer"]), **settings)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        del x
        if sample_weight is not None:
            raise ValueError(
                "tfface models do not take sample_weight or class_weight: weight tasks with "
                "ModelConfig.loss_weights and sources with data.sources[*].weight; missing labels are -1"
            )
        y = self._check_labels(y, training)
        total = ops.convert_to_tensor(0.0)
        logits = y_pred["_logits"]
        raw_logits = y_pred.get("_raw_logits") if self.model_config.deep_supervision else None
        scored = [
            (task, block, weight)
            for task, block, weight in zip(self.schema, logit_blocks(self.schema), self.task_weights)
            if task.name in y and weight != 0.0
        ]
        binary = [(task, start, weight) for task, (start, _), weight in scored if task.is_binary]
        if binary:
            # All binary tasks at once: (B, N) labels against (B, N) logits.
            labels = ops.stack([ops.reshape(ops.cast(y[t.name], "float32"), (-1,)) for t, _, _ in binary], axis=1)
            columns = [start for _, start, _ in binary]
            weights = ops.convert_to_tensor([weight for _, _, weight in binary], "float32")
            for z in (logits, raw_logits):
                if z is not None:
                    per_task = masked_binary_crossentropy_columns(labels, ops.take(z, columns, axis=1))
                    total = total + ops.sum(weights * per_task)
        for task, (start, end), weight in scored:
            if task.is_binary:
                continue
            for z in (logits, raw_logits):
                if z is not None:
                    total = total + weight * masked_sparse_categorical_crossentropy(y[task.name], z[:, start:end])
        center = getattr(self, "center_loss", None)
        if center is not None and y is not None and "_embeddings" in y_pred and self.model_config.center_loss_weight > 0:
            total = total + center(y_pred["_embeddings"], self.center_labels(y), training=training)
        if training and "_group_masks" in y_pred and "_group_masks" not in (y or {}):
            self._warn_unsupervised_masks()
        if y is not None and "_group_masks" in y_pred and "_group_masks" in y and self.model_config.mask_loss_weight > 0:
            valid = y.get("_has_landmarks", ops.ones((ops.shape(y["_group_masks"])[0],)))
            total = total + self.model_config.mask_loss_weight * masked_bce_dice(
                y["_group_masks"], y_pred["_group_masks"], valid
            )
        for extra in self.losses:
            total = total + ops.cast(extra, "float32")
        return _per_replica(total)

    def _warn_unsupervised_masks(self) -> None:
        """Once per model, at tracing: a trainable mask predictor trained
        without mask labels learns only from the attribute losses, not the
        face parts the design asks it to find (Adaptive Mask Learning)."""
        if self.model_config.mask_loss_weight <= 0 or getattr(self, "_warned_unsupervised_masks", False):
            return
        try:
            if not self.get_layer("mask_predictor").trainable:
                return  # pretrained and frozen: no mask labels needed
        except ValueError:
            return
        object.__setattr__(self, "_warned_unsupervised_masks", True)
        warnings.warn(
            "training a mask-guided model with a trainable mask predictor but no '_group_masks' labels: its masks "
            "get no supervision. Build the dataset with make_dataset(..., with_masks=True) from sources with "
            "landmarks (tfface data annotate), or pretrain the predictor first (pretrain_mask_predictor), which "
            "freezes it",
            UserWarning,
            stacklevel=user_stacklevel(),
        )

    def _check_labels(self, y, training):
        """Fails at trace time, naming the problem, where Keras would report a
        missing gradient or a None tensor deep inside the step; returns the
        labels to compute with (on TensorFlow, behind the range check, so a
        bad class id is named before a gather fails on it)."""
        if y is None:
            raise ValueError(
                ("training" if training else "evaluation")
                + " needs labels: a dict task name -> (B,) labels (-1 where missing), "
                "e.g. model.fit(images_or_dataset, labels_dict); predict() needs none"
            )
        if not isinstance(y, Mapping):
            raise ValueError(
                f"labels must be a dict task name -> (B,) labels (-1 where missing), got {type(y).__name__}; "
                f"tasks: {list(self.schema.task_names)}"
            )
        unknown = sorted(k for k in y if not k.startswith("_") and k not in self.schema.task_names)
        if unknown:
            raise ValueError(f"labels have keys that are not tasks of this model's schema: {unknown}; tasks: {list(self.schema.task_names)}")
        if not any(k in y for k in self.schema.task_names):
            raise ValueError(f"labels label none of this model's tasks: {list(self.schema.task_names)}")
        self._check_label_shapes(y)
        if self._runtime_checks():
            import tensorflow as tf

            # Out-of-range class ids otherwise fail deep in a gather or a
            # segment sum ("UnsortedSegmentSum ... out of range"). One check
            # for all tasks: one op per task would cost every step.
            present = [task for task in self.schema if task.name in y]
            labels = tf.stack([tf.cast(tf.reshape(y[task.name], [-1]), tf.float32) for task in present], axis=1)
            tops = tf.constant([1.0 if task.is_binary else task.num_classes - 1.0 for task in present])
            wrong = tf.reduce_any((labels < -1.0) | (labels > tops), axis=0)
            check = tf.debugging.Assert(
                tf.logical_not(tf.reduce_any(wrong)),
                [
                    "labels out of range (-1 for missing, else 0..classes-1); 1 marks such a task in "
                    f"({', '.join(task.name for task in present)}):",
                    tf.cast(wrong, tf.int32),
                ],
                summarize=len(present),
            )
            with tf.control_dependencies([check]):
                y = {key: tf.identity(value) for key, value in y.items()}
        return y

    def _runtime_checks(self) -> bool:
        """Whether in-graph asserts run: TensorFlow without XLA (XLA drops
        `Assert` ops; JAX has none)."""
        if keras.backend.backend() != "tensorflow":
            return False
        return not (self.compiled and self.jit_compile is True)

    def _check_image_shape(self, shape) -> None:
        """Raises unless `shape` is (B, S, S, 3); sizes not known yet (None) pass."""
        shape = tuple(shape)
        expected = (self.image_size, self.image_size, 3)
        if len(shape) != 4 or any(d is not None and d != e for d, e in zip(shape[1:], expected)):
            raise self._shape_error(shape)

    def _shape_error(self, shape) -> ValueError:
        return ValueError(
            f"images must have shape (B, {self.image_size}, {self.image_size}, 3) (or one image without B "
            f"in predict_tasks), got {tuple(shape)}; tfface.data.image_ops.preprocess_image crops and "
            "resizes images to the model's size"
        )

    def call(self, inputs, training=None, mask=None):
        image = inputs["image"] if isinstance(inputs, dict) else inputs
        self._check_image_shape(image.shape)
        if None in tuple(image.shape[1:]) and self._runtime_checks():
            # A retraced function relaxes the static shape; check at run time.
            import tensorflow as tf

            check = tf.debugging.assert_equal(
                tf.shape(image)[1:], tf.constant((self.image_size, self.image_size, 3), tf.int32),
                message=f"image batch must have shape (B, {self.image_size}, {self.image_size}, 3)",
            )
            with tf.control_dependencies([check]):
                image = tf.identity(image)
            inputs = dict(inputs, image=image) if isinstance(inputs, dict) else image
        return super().call(inputs, training=training, mask=mask)

    def center_labels(self, y):
        """(B, K) int labels of the tasks with embeddings, -1 where missing
        and for a task of loss weight 0 (not trained)."""
        batch = None
        columns = []
        for task, weight in zip(self.schema, self.task_weights):
            if task.name in y and weight != 0.0:
                column = ops.cast(ops.reshape(y[task.name], (-1,)), "int32")
                batch = column
            else:
                column = None
            columns.append(column)
        filler = ops.full_like(batch, -1) if batch is not None else None
        return ops.stack([c if c is not None else filler for c in columns], axis=1)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if y is not None:
            # Checked again: the metrics' own gathers do not wait for the loss.
            self.attribute_metrics.update_state(self._check_labels(y, training=False), y_pred)
        return self.get_metrics_result()

    def _check_label_shapes(self, labels) -> None:
        """One-hot or other (B, K) labels, named. A shape of unknown rank (a
        step Keras retraced with relaxed shapes) is checked by `fit` on the
        host instead."""
        for name in self.schema.task_names:
            shape = getattr(labels.get(name), "shape", None)
            if shape is None or getattr(shape, "rank", 0) is None:
                continue
            shape = tuple(shape)
            if len(shape) > 2 or (len(shape) == 2 and shape[1] not in (1, None)):
                raise ValueError(
                    f"labels[{name!r}] must be class ids of shape (B,) (-1 where missing), got shape {shape}; "
                    "one-hot labels: take argmax over the last axis"
                )

    # --- JAX: a failed call must not take the weights with it ------------------------
    def _purge_model_variables(self, **which):
        """Keras's JAX trainer empties the variables at the start of fit,
        evaluate and predict (their values travel through the compiled step)
        and puts them back from the last finished step. A call that fails in
        its first step (a refusal raised while the step compiles, Ctrl+C)
        has none, and left every variable empty: the model, trained or not,
        then failed every later call. The values are held here to put back."""
        held = getattr(self, "_held_jax_values", None)
        if held is not None:
            for group, purged in which.items():  # trainable_variables=True, optimizer_variables=True, ...
                if purged:
                    variables = self.optimizer.variables if group == "optimizer_variables" else getattr(self, group)
                    held.extend((v, v._value) for v in variables if v._value is not None)
        return super()._purge_model_variables(**which)

    def _keeping_jax_state(self, call, *args, **kwargs):
        if keras.backend.backend() != "jax":
            return call(*args, **kwargs)
        outer = getattr(self, "_held_jax_values", None)  # fit runs evaluate for validation
        held = [] if outer is None else outer
        # Past Keras's attribute tracking: a list of variables set on a layer
        # would join its variables.
        object.__setattr__(self, "_held_jax_values", held)
        try:
            return call(*args, **kwargs)
        except BaseException:
            if outer is None:
                # Past its first step, a failed evaluate (unlike fit) leaves the last
                # step's state unsynced; before it, the values held at the purge
                # are still whole (the step donates them only when it runs).
                self.jax_state_sync()
                self._jax_state = None
                for variable, value in reversed(held):
                    if variable._value is None:
                        variable._value = value
            raise
        finally:
            if outer is None:
                object.__setattr__(self, "_held_jax_values", None)

    def _check_label_values(self, labels) -> None:
        """Class ids of labels given as arrays, checked on the host. The step
        checks them too, but only on TensorFlow: under JAX an id past the
        last class gave a NaN loss, and a binary label of 2 trained without a
        word towards an infinite logit."""
        for task in self.schema:
            values = labels.get(task.name)
            if not isinstance(values, (np.ndarray, list, tuple)):
                continue  # tensors and datasets: the step's check (TensorFlow)
            values = np.asarray(values, dtype=np.float64).reshape(-1)
            top = 1 if task.is_binary else task.num_classes - 1
            wrong = values[(values < -1) | (values > top)]
            if wrong.size:
                raise ValueError(
                    f"labels[{task.name!r}] holds {wrong[0]:g}, out of range: -1 for missing, else 0..{top} "
                    f"({'binary' if task.is_binary else f'{task.num_classes} classes'}); {wrong.size} such label(s)"
                )
            if not task.is_binary:
                fractional = values[values != np.round(values)]
                if fractional.size:  # the step casts to int: 3.5 trained as class 3
                    raise ValueError(
                        f"labels[{task.name!r}] holds {fractional[0]:g}: class ids are whole numbers "
                        f"(-1 for missing, else 0..{top}); {fractional.size} such label(s)"
                    )
            elif min((values == -1).sum(), (values == 1).sum()) >= SIGN_ENCODED_MIN and not (values == 0).any():
                # CelebA's list_attr_celeba.txt writes -1/+1: taken as is, every
                # negative reads as missing and the scores are all 1.0.
                raise ValueError(
                    f"labels[{task.name!r}] are -1 and 1 with no 0: tfface takes 0/1 with -1 for missing, so "
                    "every -1 would be left out as unlabelled. CelebA's -1/+1 encoding converts with "
                    "(labels + 1) // 2"
                )

    def fit(self, x=None, y=None, *args, **kwargs):
        return self._keeping_jax_state(self._fit, x, y, *args, **kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        return self._keeping_jax_state(self._evaluate, x, y, *args, **kwargs)

    def _fit(self, x=None, y=None, *args, **kwargs):
        if kwargs.get("class_weight") is not None:
            raise ValueError(
                "tfface models do not take class_weight: weight tasks with ModelConfig.loss_weights "
                "(by task name or family) and sources with data.sources[*].weight"
            )
        # On the host too: after a first fit, Keras may retrace with shapes
        # of unknown rank, which the trace-time check cannot read.
        spec = getattr(x, "element_spec", None)
        labels = y if y is not None else (spec[1] if isinstance(spec, tuple) and len(spec) > 1 else None)
        if isinstance(labels, Mapping):
            self._check_label_shapes(labels)
            self._check_label_values(labels)
        if spec is not None and len(args) < 7:  # shuffle is fit's 7th argument after x and y
            # A dataset shuffles itself; Keras warns about its default True.
            kwargs.setdefault("shuffle", False)
        self._check_input_images(x)
        warn_if_unit_range(x)
        validation = kwargs.get("validation_data")
        if isinstance(validation, tuple) and validation:
            if len(validation) == 3:
                # Else refused by compute_loss only once the first epoch is trained.
                raise ValueError(
                    "validation_data has a third item (sample weights): tfface models do not take sample_weight; "
                    "pass (images, labels), with -1 for missing labels"
                )
            if len(validation) > 1 and isinstance(validation[1], Mapping):
                self._check_label_values(validation[1])
            kwargs["validation_data"] = (self._named_images(validation[0]),) + validation[1:]
        elif validation is not None:
            kwargs["validation_data"] = self._named_images(validation)
        return super().fit(self._named_images(x), y, *args, **kwargs)

    def _evaluate(self, x=None, y=None, *args, **kwargs):
        if isinstance(y, Mapping):
            self._check_label_values(y)
        self._check_input_images(x)
        warn_if_unit_range(x)
        return super().evaluate(self._named_images(x), y, *args, **kwargs)

    def _named_images(self, x):
        """A bare batch of images (an array or tensor) as the model's one
        named input: Keras takes it either way, but warns on every call
        that its structure differs from the model's inputs."""
        if [getattr(t, "name", None) for t in self.inputs] != ["image"]:
            return x
        spec = getattr(x, "element_spec", None)
        if spec is not None and hasattr(x, "map"):  # a tf.data dataset of bare images
            first = spec[0] if isinstance(spec, tuple) else spec
            if isinstance(first, Mapping) or not hasattr(first, "shape"):
                return x
            if isinstance(spec, tuple):
                return x.map(lambda images, *rest: ({"image": images}, *rest))
            return x.map(lambda images: {"image": images})
        if x is None or isinstance(x, Mapping) or not hasattr(x, "shape"):
            return x
        return {"image": x}

    def _check_input_images(self, x) -> None:
        """The image size of arrays, and of datasets by their element spec,
        checked on the host: once Keras retraces with a relaxed shape only an
        in-graph check sees it (XLA drops it), and the mask predictor's
        upsampling fails to trace on the wrong size before that check runs."""
        spec = getattr(x, "element_spec", None)
        images = (spec[0] if isinstance(spec, tuple) else spec) if spec is not None else x
        if isinstance(images, Mapping):
            images = images.get("image")
        shape = getattr(images, "shape", None)
        if shape is None or getattr(shape, "rank", 0) is None:
            return
        shape = tuple(shape)
        if spec is not None and shape[-3:] == (self.image_size, self.image_size, 3) and len(shape) == 3:
            raise ValueError(
                f"the dataset yields single images of shape {shape}: batch it first, e.g. dataset.batch(32)"
            )
        self._check_image_shape(shape)

    # --- prediction -------------------------------------------------------------
    def predict(self, x, *args, **kwargs):
        return self._keeping_jax_state(self._predict, x, *args, **kwargs)

    def _predict(self, x, *args, **kwargs):
        self._check_input_images(x)
        warn_if_unit_range(x)
        return super().predict(self._named_images(x), *args, **kwargs)

    def predict_tasks(self, images, batch_size=64):
        """Public outputs only, as numpy: {task: probabilities}.

        `images`: (B, S, S, 3) at the model's size, values 0..255; a single
        (S, S, 3) image is a batch of one.
        """
        others = sorted(name for name in (getattr(t, "name", "") for t in self.inputs) if name != "image")
        if others:
            raise ValueError(
                f"this model also takes {others} (use_landmark_masks): call "
                "model.predict({'image': images, 'group_masks': masks}), or tfface.predict.predict_faces, "
                "which draws the masks from detected landmarks"
            )
        images = np.asarray(images)
        warn_if_unit_range(images)
        images = images.astype(np.float32, copy=False)
        if images.ndim == 3:
            images = images[None]
        self._check_image_shape(images.shape)
        if len(images) == 0:
            return {
                t.name: np.zeros((0,) if t.is_binary else (0, t.num_classes), np.float32) for t in self.schema
            }
        outputs = super().predict({"image": images}, batch_size=batch_size, verbose=0)  # checked above
        return {k: v for k, v in outputs.items() if not k.startswith("_")}

    @property
    def public_output_names(self):
        return list(self.schema.task_names)

    # --- serialisation ------------------------------------------------------------
    def save(self, filepath, *args, **kwargs):
        if str(filepath).lower().endswith((".h5", ".hdf5")):
            # Keras writes its legacy format with a warning, but neither
            # tfface.models.load_model nor keras.saving.load_model reads a
            # tfface model back from it: work saved that way looked lost.
            raise ValueError(
                f"{filepath}: tfface models save as .keras (model.save('model.keras')); the weights alone "
                "go to a .weights.h5 file (model.save_weights('model.weights.h5'))"
            )
        return super().save(filepath, *args, **kwargs)

    def get_config(self):
        config = {
            "name": self.name,
            "schema": self.schema.to_dict(),
            "config": dataclasses.asdict(self.model_config),
        }
        # The graph is rebuilt from the ModelConfig on loading, so layers a
        # user froze (a backbone for fine-tuning) are named to stay frozen,
        # and the saved optimizer state still matches the trainable weights.
        frozen = [path for path, layer, parent_frozen in _layer_paths(self) if not layer.trainable and not parent_frozen]
        if frozen:
            config["frozen_layers"] = frozen
        if not self.trainable:
            # `model.trainable = False` as a whole: reloaded with only its
            # layers frozen, the model read as trainable, so a later
            # `model.trainable = True` changed nothing and nothing trained.
            config["trainable"] = False
        return config

    def _freeze_layers(self, paths) -> None:
        if not paths:
            return
        by_path = {path: layer for path, layer, _ in _layer_paths(self)}
        unknown = [p for p in paths if p not in by_path]
        if unknown:
            warnings.warn(f"frozen layers {unknown} are not in this {type(self).__name__}; left as built")
        for path in paths:
            if path in by_path:
                by_path[path].trainable = False

    @classmethod
    def from_config(cls, config, custom_objects=None):
        # The saved weights replace the backbone's: loading must not need the
        # original weights file (or a download) any more.
        model_config = config.get("config")
        if isinstance(model_config, dict) and model_config.get("backbone_weights"):
            config = dict(config, config=dict(model_config, backbone_weights=None))
        # `restoring`: the weights come from the file, so nothing that
        # construction would compute from training data is needed.
        trainable = config.get("trainable", True)
        model = cls(**{k: v for k, v in config.items() if k != "trainable"}, restoring=True)
        if not trainable:
            model.trainable = False
        return model
