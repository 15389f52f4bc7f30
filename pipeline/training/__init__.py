"""Fine-tuning the ReID embedder: P×K sampling, augmentation, ID / batch-hard triplet / OIM
losses and a resumable training loop whose checkpoints load like published weights."""
