"""Fine-tuning the ReID embedder: P×K sampling, augmentation, ID / batch-hard triplet / OIM
losses and a resumable training loop whose checkpoints load like published weights."""
LOSSES = ("id", "triplet", "oim")  # torch-free, so the CLI can list them without importing torch
# Defaults that keep the base model (chosen from measurements: docs/training.md, "Forgetting"): the
# domain gate gives crops unlike the training site the base's features, and the tuned network is the
# WiSE-FT mix at α 0.4. There is no base from scratch: `reidx train --init none` uses α 1, no gate.
WISE_ALPHA = 0.4
DISTILL_WEIGHT = 0.0
DOMAIN_GATE = True
