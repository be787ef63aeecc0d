"""KerasTuner hypermodels: one per model type, built from a base experiment.

A hypermodel turns sampled hyperparameter values into an `ExperimentConfig`
(the base experiment with those values set) and builds and compiles the
model that config names, exactly as `tfface train` would. So the best
trial's values, written back as a config, train the same network.
"""

from __future__ import annotations

import copy

import keras_tuner

from tfface.config import ConfigError
from tfface.config import ExperimentConfig
from tfface.tuning.search_space import SearchSpace

OBJECTIVE = "val_mean_balanced_accuracy"


def objective() -> keras_tuner.Objective:
    """Validation mean balanced accuracy over the labelled binary attributes
    (masked: missing labels count for nothing), maximised."""
    return keras_tuner.Objective(OBJECTIVE, direction="max")


class FaceHyperModel(keras_tuner.HyperModel):
    """Builds the model of `base_config` with a trial's values applied.

    Args:
        base_config: the experiment a search varies; its `model.type` must be
            this hypermodel's `model_type`.
        search_space: a `SearchSpace` already checked against `base_config`.
        steps_per_epoch: training steps per epoch, for the learning-rate
            schedule (the data is loaded once, before the search).
        schedule_epochs: epochs the learning-rate schedule decays over (the
            epochs of one trial).
        train_labels: task -> training labels (`training_labels`), needed
            when a trial may start the correlation layer from them
            (`correlation_init: label_correlation`).
        builds_models: False for a distributed search's chief, which hands
            out trials and builds no model (so needs no labels).
    """

    model_type = None

    def __init__(self, base_config: ExperimentConfig, search_space: SearchSpace, steps_per_epoch=1,
                 schedule_epochs=1, train_labels=None, builds_models=True, name=None):
        super().__init__(name=name or f"{self.model_type}_hypermodel")
        if base_config.model.type != self.model_type:
            raise ConfigError(
                f"{type(self).__name__} tunes model.type '{self.model_type}', "
                f"the experiment has '{base_config.model.type}'"
            )
        from tfface.schema import get_schema

        self.base_config = base_config
        self.search_space = search_space
        self.schema = get_schema(base_config.data.schema)
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.schedule_epochs = max(1, int(schedule_epochs))
        self.train_labels = train_labels
        # Refused here, before the search: as failed trials, three in a row
        # would stop it.
        search_space.check_trial_schedule(base_config, self.schedule_epochs)
        if (
            builds_models
            and train_labels is None
            and True in search_space.possible_values(base_config, "model", "correlation")
            and "label_correlation" in search_space.possible_values(base_config, "model", "correlation_init")
        ):
            raise ConfigError(
                f"{search_space.source}: trials may start the correlation layer from the training labels "
                "(correlation_init: label_correlation); pass train_labels="
                "tfface.training.trainer.training_labels(schema, train_sources)"
            )

    def declare_hyperparameters(self, hp):
        self.search_space.declare(hp)

    def trial_config(self, hp) -> ExperimentConfig:
        """The experiment config of these hyperparameter values."""
        values = self.search_space.declare(hp)
        return self.search_space.apply(self.base_config, values)

    def build(self, hp):
        return build_trial_model(
            self.trial_config(hp), self.steps_per_epoch, self.schedule_epochs, self.train_labels
        )

    def fit(self, hp, model, *args, **kwargs):
        config = self.trial_config(hp)
        # Hyperband's later rounds start from a trial's saved weights, whose
        # predictor is pretrained already.
        if "tuner/trial_id" not in hp.values:
            from tfface.training.trainer import pretrain_masks

            # The search's deadline stops the pretraining too; the other
            # callbacks watch the attribute objective, which it has not.
            deadline = [c for c in kwargs.get("callbacks") or [] if getattr(c, "applies_to_pretraining", False)]
            pretrain_masks(
                config, model, args[0] if args else kwargs["x"], None, kwargs.get("verbose", "auto"), callbacks=deadline
            )
        return model.fit(*args, **kwargs)


def build_trial_model(config: ExperimentConfig, steps_per_epoch: int, schedule_epochs: int, train_labels=None):
    """The compiled model of one trial: `config`'s model, its learning-rate
    schedule decaying over the trial's `schedule_epochs`, not the full run."""
    from tfface.schema import get_schema
    from tfface.training.trainer import _mixed_precision
    from tfface.training.trainer import _optimizer
    from tfface.models.build import build_model

    # KerasTuner clears the Keras session before each build, which also
    # resets the dtype policy: set it again.
    _mixed_precision(config.train.mixed_precision)
    model = build_model(get_schema(config.data.schema), config.model, train_labels)
    schedule = copy.deepcopy(config)
    schedule.train.epochs = schedule_epochs
    schedule.train.steps_per_epoch = steps_per_epoch
    model.compile(optimizer=_optimizer(schedule, None))
    return model


class GatedHyperModel(FaceHyperModel):
    """Gated MTL-CNN: gate type and initialisation, correlation, center loss,
    loss weights, dropout, learning rate (see tuning/gated_search_space.yaml)."""

    model_type = "gated"


class MaskGuidedHyperModel(FaceHyperModel):
    """Mask-guided network: mask-loss weight, fusion, loss weights, dropout,
    learning rate (see tuning/mask_guided_search_space.yaml)."""

    model_type = "mask_guided"


HYPERMODELS = {cls.model_type: cls for cls in (GatedHyperModel, MaskGuidedHyperModel)}


def hypermodel_for(base_config: ExperimentConfig, search_space: SearchSpace, **kwargs) -> FaceHyperModel:
    """The hypermodel of `base_config.model.type`."""
    if base_config.model.type not in HYPERMODELS:
        raise ConfigError(f"no hypermodel for model.type '{base_config.model.type}'; have {sorted(HYPERMODELS)}")
    return HYPERMODELS[base_config.model.type](base_config, search_space, **kwargs)
