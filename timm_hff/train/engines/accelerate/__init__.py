"""The Accelerate engine: ``Trainer`` (set-up, evaluation, checkpoints) and its epoch loop (``steps``)."""
__all__ = []
