"""m2mKD: module pairs, the distillation loss, the trainer, checkpoints, the pipeline phases."""
