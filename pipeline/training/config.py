"""What defines a fine-tuning run: :class:`TrainConfig`, stored in every checkpoint, and its checks."""

from __future__ import annotations

from dataclasses import dataclass, field

from reidx.pipeline.models.osnet import OSNET_CHANNELS
from reidx.pipeline.training import (BASE_SHARE, DISTILL_WEIGHT, DOMAIN_GATE, HEAD_INIT, LOSSES, RECOMPUTE_BN,
                                     WISE_ALPHA)
from reidx.pipeline.training.head import HEAD_INITS
from reidx.pipeline.training.retention import check_stages


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in every checkpoint)."""

    data: str
    out: str
    init: str | None = "osnet_x0_25_msmt17"  # weights to start from; None trains from scratch
    arch: str = "osnet_x0_25"  # used only from scratch (a checkpoint's width is read from it)
    losses: dict[str, float] = field(default_factory=lambda: {"id": 1.0, "triplet": 1.0})
    epochs: int = 12
    p: int = 16
    k: int = 4
    lr: float = 3.5e-4
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    schedule: str = "cosine"  # or "step": ×0.1 at each of step_epochs
    step_epochs: list[int] = field(default_factory=list)
    min_lr_factor: float = 0.01  # cosine ends at lr × this
    label_smoothing: float = 0.1
    margin: float = 0.3
    soft_margin: bool = False
    triplet_normalise: bool = False  # triplet distances between L2-normalised features
    id_margin: float | None = None  # None: linear softmax classifier; m: cosine classifier, additive margin m
    oim_scale: float = 30.0  # 1/τ
    oim_momentum: float = 0.5  # γ
    oim_queue: int = 5000
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 where supported, else fp32
    seed: int = 0
    threads: int | None = None  # CPU threads for torch (None: torch's default, one per core)
    val_query: str | None = None
    val_gallery: str | None = None
    val_every: int = 0  # with a validation split: every N epochs as well (0: only the output, at the end)
    val_other: list[str] | None = None  # [query, gallery] of a second domain, scored at the end (base vs output)
    wise_alpha: float | None = None  # output (1 − α)·base + α·fine-tuned (WiSE-FT); None: WISE_ALPHA, 1 without init
    distill_weight: float | None = None  # cosine distillation towards the base; None: DISTILL_WEIGHT, 0 without init
    distill_view: str = "same"  # distil on the training batch itself, or on a "photometric" copy of it
    train_stages: list[str] | None = None  # OSNet stages that learn (retention.STAGES); None: all
    domain_gate: bool | None = None  # keep the base's features on crops unlike the training site; None: DOMAIN_GATE
    base_share: float | None = None  # the base's share of the features on the site (needs the gate); None:
    #                                  BASE_SHARE with the gate, else 0
    recompute_bn: bool | None = None  # BatchNorm statistics of the output recomputed on the clean training
    #                                   crops after the WiSE-FT mix; None: RECOMPUTE_BN
    soup_with: list[str] | None = None  # resume checkpoints of other seeds of this run: the tuned network is the
    #                                     soup (mean) of theirs and this run's, before the WiSE-FT mix
    head_init: str | None = None  # the new classifier: "random", or "probe" (fitted on the frozen features
    #                               first: LP-FT); None: HEAD_INIT with a base model and the id loss, else random

    def __post_init__(self) -> None:
        if self.wise_alpha is None:
            self.wise_alpha = WISE_ALPHA if self.init else 1.0
        if self.distill_weight is None:
            self.distill_weight = DISTILL_WEIGHT if self.init else 0.0
        if self.domain_gate is None:
            self.domain_gate = DOMAIN_GATE and bool(self.init)
        if self.base_share is None:
            self.base_share = BASE_SHARE if self.domain_gate else 0.0
        if self.recompute_bn is None:
            self.recompute_bn = RECOMPUTE_BN
        if self.head_init is None:
            self.head_init = HEAD_INIT if self.init and "id" in self.losses else "random"

    def check(self) -> None:
        unknown = set(self.losses) - set(LOSSES)
        if not self.losses or unknown:
            raise ValueError(f"unknown loss(es) {sorted(unknown)}; combine {', '.join(LOSSES)} with '+'")
        if any(w <= 0 for w in self.losses.values()):
            raise ValueError("loss weights must be positive")
        if self.schedule not in ("cosine", "step"):
            raise ValueError(f"schedule must be cosine or step, not {self.schedule!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, not {self.precision!r}")
        if self.init is None and self.arch not in OSNET_CHANNELS:
            raise ValueError(f"unknown OSNet architecture {self.arch!r}; known: {', '.join(OSNET_CHANNELS)}")
        if bool(self.val_query) != bool(self.val_gallery):
            raise ValueError("validation needs both --val-query and --val-gallery")
        if self.epochs < 1:
            raise ValueError("epochs must be at least 1")
        if not 0.0 <= self.wise_alpha <= 1.0 or self.distill_weight < 0:
            raise ValueError("wise_alpha must lie in [0, 1] and distill_weight be ≥ 0")
        if self.init is None and (self.wise_alpha < 1.0 or self.distill_weight > 0 or self.domain_gate):
            raise ValueError("--wise-alpha < 1, --distill-weight and --domain-gate need a base model to keep (--init)")
        if not 0.0 <= self.base_share < 1.0:
            raise ValueError(f"base_share must lie in [0, 1), not {self.base_share!r}")
        if self.base_share > 0 and not self.domain_gate:
            raise ValueError("--base-share keeps the base's features beside the tuned network's on the site: "
                             "it needs the domain gate (the checkpoint then holds both networks)")
        if self.val_other is not None and len(self.val_other) != 2:
            raise ValueError("val_other is [query, gallery]")
        check_stages(self.train_stages)
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {', '.join(HEAD_INITS)}, not {self.head_init!r}")
        if self.head_init == "probe" and (self.init is None or "id" not in self.losses):
            raise ValueError("--head-init probe fits the id loss's classifier on a base model's features: "
                             "it needs --init and the id loss")
        if self.id_margin is not None and not 0.0 <= self.id_margin < 1.0:
            raise ValueError(f"id_margin is a cosine margin in [0, 1), not {self.id_margin!r}")
        if self.id_margin is not None and "id" not in self.losses:
            raise ValueError("--id-margin shapes the id loss's classifier: it needs the id loss (--loss id+…)")
        if self.soup_with is not None and len({str(p) for p in self.soup_with}) != len(self.soup_with):
            raise ValueError("--soup-with names a run twice")
        if self.distill_view not in ("same", "photometric"):
            raise ValueError(f"distill_view must be same or photometric, not {self.distill_view!r}")
