"""Fine-tuning the ReID embedder: P×K sampling, augmentation, ID / batch-hard triplet / OIM
losses and a resumable training loop whose checkpoints load like published weights."""
LOSSES = ("id", "triplet", "oim")  # torch-free, so the CLI can list them without importing torch
WISE_ALPHA = 0.3  # default WiSE-FT coefficient, chosen from measurements in docs/training.md ("Forgetting")
