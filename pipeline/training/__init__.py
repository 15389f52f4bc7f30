"""Fine-tuning the ReID embedder: P×K sampling, augmentation, ID / batch-hard triplet / OIM
losses and a resumable training loop whose checkpoints load like published weights."""
LOSSES = ("id", "triplet", "oim")  # torch-free, so the CLI can list them without importing torch
# Defaults that keep the base model (chosen from measurements: docs/training.md, "Forgetting"): the
# domain gate gives crops unlike the training site the base's features, the tuned network is the
# WiSE-FT mix at α 0.8 (cross-validated over four folds: benchmarks/train_cv.py), crops of the site
# get its features alone (BASE_SHARE 0: the base's share there was measured and not adopted), and its
# new classifier starts as a linear probe of the base's features ("Chasing Con-ReID 90"). There is no
# base from scratch: `reidx train --init none` uses α 1, no gate, a random classifier (so does a run
# without the id loss: no classifier to probe).
WISE_ALPHA = 0.8
BASE_SHARE = 0.0
DISTILL_WEIGHT = 0.0
DOMAIN_GATE = True
HEAD_INIT = "probe"
RECOMPUTE_BN = False
