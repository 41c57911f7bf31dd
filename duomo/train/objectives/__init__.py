"""Training objectives per model family, all run by `duomo.train.trainer.Trainer`."""
