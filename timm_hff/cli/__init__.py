"""The console scripts, one module each; importing this package imports none of them (``--help`` stays light).

    train          hff-train: a recipe (YAML) and flag overrides -> a run (``timm_hff.train``)
    validate       hff-validate: a saved or Hub model scored on a split, as timm's validate.py
    predict        hff-predict: image files -> top-k class names, as timm's inference.py
    push           hff-push: a saved model folder -> the Hugging Face Hub, with its card
    seed_weights   hff-seed-weights: timm's pretrained weights into the Hub cache, offline

The old module paths (``timm_hff.validate``, ``timm_hff.predict``, ``timm_hff.hub_cli``, ``timm_hff.seed_cli``,
``timm_hff.train.cli``) stay as deprecated aliases.
"""
__all__ = []
