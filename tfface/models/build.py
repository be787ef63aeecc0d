"""`build_model`: the model class a `ModelConfig` names, ready to compile."""

from __future__ import annotations


def build_model(schema, model_config, train_labels=None, name=None):
    """The model class named by `model_config.type`.

    Args:
        train_labels: task name -> training labels
            (`tfface.training.trainer.training_labels`); needed when the
            config starts the correlation layer from them
            (`correlation_init: label_correlation`), ignored otherwise.
        name: the Keras model's name (default: "gated_multitask" or
            "mask_guided_multitask").
    """
    from tfface.models.gated_multitask_model import GatedMultiTaskModel
    from tfface.models.mask_guided_model import MaskGuidedMultiTaskModel

    if model_config.type != "gated":
        return MaskGuidedMultiTaskModel(schema=schema, config=model_config, name=name or "mask_guided_multitask")
    return GatedMultiTaskModel(schema=schema, config=model_config, train_labels=train_labels, name=name or "gated_multitask")
