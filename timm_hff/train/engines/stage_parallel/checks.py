"""The settings ``schedule: stage_parallel`` does not (yet) combine with, refused in one line each."""

__all__ = ['check_settings']


def check_settings(cfg) -> None:
    """Settings the stage-parallel schedule does not (yet) combine with: one line each, before any work."""
    unsupported = dict(freeze_stages=bool(cfg.freeze_stages), head_only=cfg.head_only, streaming=cfg.streamed,
                       grad_checkpointing=cfg.grad_checkpointing, log_with=cfg.log_with is not None,
                       calibrate_exits=cfg.calibrate_exits is not None)
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"schedule 'stage_parallel' does not support {', '.join(bad)} yet; drop it or use schedule "
                         f"simultaneous (calibrate_exits: run timm_hff.calibrate_exits on the saved model)")
