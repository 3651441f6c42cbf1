"""Where a run is tracked: the logger registry (loggers) and everything of W&B (wandb_logger,
wandb_panels). Importing this package registers the built-in loggers, W&B's included."""

from mtkd.tracking import wandb_logger  # noqa: F401  (registers wandb and wandb_offline)
