"""Training: contrastive losses, the trainer (checkpoints, exact resume, AMP, accumulation), DDP helpers."""

from duomo.train.config import TrainConfig
from duomo.train.losses import ClipLoss, SigLipLoss, build_loss
from duomo.train.objectives.clip import ContrastiveObjective
from duomo.train.trainer import Objective, Trainer

__all__ = [
    "ClipLoss",
    "ContrastiveObjective",
    "Objective",
    "SigLipLoss",
    "TrainConfig",
    "Trainer",
    "build_loss",
]
