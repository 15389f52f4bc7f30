"""Fine-tuning the ReID embedder: P×K sampling, augmentation, ID / batch-hard triplet / OIM
losses and a resumable training loop whose checkpoints load like published weights."""
LOSSES = ("id", "triplet", "oim")  # torch-free, so the CLI can list them without importing torch
# Defaults that keep the base model (chosen from measurements: docs/training.md, "Forgetting"). There is
# no base from scratch: `reidx train --init none` then uses α 1 and no distillation (TrainConfig asks for them).
WISE_ALPHA = 0.3
DISTILL_WEIGHT = 1.0
