"""Fine-tuning: typed configs, data, freezing policies, the training loop and checkpoints.

``pyfast train --config configs/NAME.yaml [key=value ...]`` on the command line;
``Recipe(load_config(path, overrides)).run()`` from Python. Subclass :class:`Recipe` (override
``compute_loss`` / ``batch_weight`` / ``load_data``) for other objectives.
"""

from pyfast.train.config import TrainConfig, load_config
from pyfast.train.recipe import Recipe, TrainingStopped

__all__ = ["Recipe", "TrainConfig", "TrainingStopped", "load_config"]
