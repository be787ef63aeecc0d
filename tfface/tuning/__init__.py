"""KerasTuner search over gates, loss weights and training settings.

`run_search(tuning_config_path)` (or `tfface tune --config FILE`) searches
the space of a YAML file (tfface.tuning.search_space) with a hypermodel per
model type (tfface.tuning.hypermodels) and writes the best values back as a
training config.
"""

from tfface.tuning.search import TuningConfig
from tfface.tuning.search import TuningError
from tfface.tuning.search import run_search
from tfface.tuning.search import tune_main
from tfface.tuning.search_space import SearchSpace

__all__ = ["SearchSpace", "TuningConfig", "TuningError", "run_search", "tune_main"]
