"""Training checkpoints: where the resume checkpoint lives, writing it atomically, and checking
that a resumed run is the same run (same data, same options)."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from reidx.pipeline.atomic import save_torch_atomic

# Options that may change between a run and its resumption (device and threads change float rounding only).
# wise_alpha, domain_gate, base_share, recompute_bn and soup_with only shape the output at the end: a finished
# run resumed with others re-makes it.
RESUME_MAY_DIFFER = {"out", "device", "threads", "val_query", "val_gallery", "val_every", "val_other", "wise_alpha",
                     "domain_gate", "base_share", "recompute_bn", "soup_with"}
# Options added after the first checkpoints: what their absence from an older checkpoint means.
ADDED_LATER = {"distill_weight": 0.0, "train_stages": None, "distill_view": "same", "head_init": "random",
               "recompute_bn": False, "triplet_normalise": False, "id_margin": None}


class RunExistsError(FileExistsError):
    """A fresh start asked for where an earlier run's resume checkpoint is kept (it would be trained over)."""


def resume_path(out: str | os.PathLike) -> Path:
    """Where the per-epoch checkpoint of a run writing ``out`` lives: ``model.pth`` → ``model.resume.pth``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.resume{out.suffix or '.pth'}")


def save_checkpoint(obj: dict, path: Path) -> None:
    save_torch_atomic(obj, path)


def plain_config(config) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}


def check_resumable(saved: dict, config, data_hash: str, path: Path) -> None:
    """A resume continues exactly only with the same training data and the same options."""
    meta = saved.get("reidx_training", {})
    if meta.get("data_hash") != data_hash:
        raise ValueError(f"{path} was trained on other data (hash {str(meta.get('data_hash'))[:12]}, now "
                         f"{data_hash[:12]}); resume needs the same training data")
    changed = changed_options(meta, config, RESUME_MAY_DIFFER)
    if changed:
        raise ValueError(f"cannot resume {path} exactly with changed options ({'; '.join(changed)}); "
                         f"rerun with the options it was started with")


def changed_options(meta: dict, config, may_differ: set[str]) -> list[str]:
    """``option: then → now`` for each option of ``config`` that differs from the saved run's."""
    before, now = meta.get("config", {}), plain_config(config)
    return [f"{k}: {before.get(k, ADDED_LATER.get(k))!r} → {now[k]!r}" for k in now
            if k not in may_differ and before.get(k, ADDED_LATER.get(k)) != now[k]]


def check_soup_member(saved: dict, config, data_hash: str, path) -> None:
    """A run joins this run's soup only as another seed of it: a finished run's resume checkpoint,
    same training data, same options but the seed (and what shapes only the output)."""
    meta = saved.get("reidx_training") if isinstance(saved, dict) else None
    if not isinstance(meta, dict) or "optimizer" not in saved or "state_dict" not in saved:
        raise ValueError(f"{path} is not a resume checkpoint of `reidx train` (give a run's MODEL.resume.pth: its "
                         f"output is already mixed with the base)")
    if meta.get("data_hash") != data_hash:
        raise ValueError(f"{path} was trained on other data (hash {str(meta.get('data_hash'))[:12]}, this run "
                         f"{data_hash[:12]}): a soup needs runs on the same training data")
    changed = changed_options(meta, config, RESUME_MAY_DIFFER | {"seed"})
    if changed:
        raise ValueError(f"{path} differs from this run in more than the seed ({'; '.join(changed)}): a soup "
                         f"averages runs of one recipe")
    if meta.get("epochs") != config.epochs:
        raise ValueError(f"{path} has finished {meta.get('epochs')} of {config.epochs} epochs; finish it first "
                         f"(reidx train … --resume)")
