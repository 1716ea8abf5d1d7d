from .distributed import DistInfo, init_distributed
from .trainer import NonFiniteLossError, TrainConfig, Trainer

__all__ = ["DistInfo", "init_distributed", "NonFiniteLossError", "TrainConfig", "Trainer"]
