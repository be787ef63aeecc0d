"""`build_model`: the model class a `ModelConfig` names, ready to compile."""

from __future__ import annotations

from tfface.config import ConfigError


def build_model(schema, model_config, train_labels=None):
    """The model class named by `model_config.type`.

    Args:
        train_labels: task name -> training labels
            (`tfface.training.trainer.training_labels`); needed when the
            config starts the correlation layer from them
            (`correlation_init: label_correlation`), ignored otherwise.
    """
    from tfface.models.gated_multitask_model import GatedMultiTaskModel
    from tfface.models.mask_guided_model import MaskGuidedMultiTaskModel

    if model_config.type != "gated":
        return MaskGuidedMultiTaskModel(schema=schema, config=model_config, name="mask_guided_multitask")
    model = GatedMultiTaskModel(schema=schema, config=model_config, name="gated_multitask")
    if model_config.correlation and model_config.correlation_init == "label_correlation":
        if train_labels is None:
            raise ConfigError("model.correlation_init 'label_correlation' needs the training labels (train_labels)")
        model.init_correlation_from_labels(train_labels)
    return model
