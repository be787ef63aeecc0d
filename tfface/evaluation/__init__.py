"""Evaluation: metrics, subgroup table, plots, report, threshold calibration."""

from tfface.evaluation.calibration import apply_thresholds
from tfface.evaluation.calibration import calibrate_model
from tfface.evaluation.calibration import calibrate_thresholds
from tfface.evaluation.evaluate import collect_predictions
from tfface.evaluation.evaluate import compute_metrics
from tfface.evaluation.evaluate import evaluate_model
from tfface.evaluation.evaluate import format_metrics
from tfface.evaluation.evaluate import load_model
from tfface.evaluation.evaluate import print_metrics
from tfface.evaluation.evaluate import subgroup_metrics

__all__ = [
    "apply_thresholds",
    "calibrate_model",
    "calibrate_thresholds",
    "collect_predictions",
    "compute_metrics",
    "evaluate_model",
    "format_metrics",
    "load_model",
    "print_metrics",
    "subgroup_metrics",
]
