"""Saved HFF models in timm's Hub layout (``config.json`` + ``model.safetensors`` + ``README.md``).

The modules, in the order the data flows (each imports only those above it):

    _errors         one error class per cause (CheckpointError and its subclasses)
    _names          names that become paths, URLs or card text (revisions, folders, labels): checked
    _values         the nested sections of config.json (pretrained_cfg, stages, metrics, recipe): checked
    _format         config.json: file names, format version, schema; read and validate it
    _build_config   a model -> its config.json content (settings, timm kwargs, stages, metrics, recipe)
    _weights        model.safetensors: write it, read its header and tensors (never a pickle), verify its sha256
                    (folders are replaced whole by timm_hff._io.atomic_dir: a crash never leaves half a model)
    _card           the model card (README.md), from config.json alone
    _save           save_pretrained: config, weights and card into one folder
    _resolve        'local-dir:' / 'hf-hub:' names -> files (the Hub cache, offline mode, revisions)
    _dry_build      the model config.json describes, built on the meta device and held against the header
    _load           load_pretrained_hff: validate, check against the header, build, load
    _push           push_to_hub: verify, card, upload
    _export         export_timm: a stock timm classifier that loads without timm_hff
    _seed           timm's pretrained weights from a plain state dict into the Hub cache (hff-seed-weights)

Nothing here imports ``timm_hff._factory`` or ``timm_hff._registry``: they sit above the hub and call into it.
"""
from ..core import lazy_exports

_EXPORTS = {
    **dict.fromkeys(['CheckpointError', 'CheckpointFileNotFoundError', 'ConfigError',
        'CorruptCheckpointError', 'FormatVersionError', 'ResourceLimitError', 'ShapeMismatchError',
        'UnknownArchitectureError', 'UnsafeCheckpointError', 'one_line'], '._errors'),
    **dict.fromkeys(['CARD_NAME', 'CONFIG_NAME', 'FORMAT_VERSION', 'GENERIC_ARCH', 'HUB_FILES',
        'RUNTIME_SETTINGS', 'WEIGHTS_NAME', 'SavedConfig', 'parse_config', 'read_config'], '._format'),
    **dict.fromkeys(['build_config', 'saved_timm_kwargs', 'unwrap_model'], '._build_config'),
    **dict.fromkeys(['PICKLE_SUFFIXES', 'file_sha256', 'read_weights'], '._weights'),
    **dict.fromkeys(['atomic_dir'], '.._io'),
    **dict.fromkeys(['MAX_KWARG_INT', 'check_json'], '._values'),
    **dict.fromkeys(['check_folder_name', 'check_path', 'check_text'], '._names'),
    **dict.fromkeys(['CARD_TEMPLATE', 'build_model_card', 'hub_dataset_id'], '._card'),
    **dict.fromkeys(['save_pretrained'], '._save'),
    **dict.fromkeys(['HUB_KWARGS'], '._resolve'),
    **dict.fromkeys(['load_from_timm_source', 'load_pretrained_hff', 'load_state_checked'], '._load'),
    **dict.fromkeys(['push_to_hub'], '._push'),
    **dict.fromkeys(['ExportError', 'export_timm', 'fold_last_head'], '._export'),
    **dict.fromkeys(['SeededWeights', 'convert_state_dict', 'read_state_dict', 'seed_timm_cache',
        'write_converted'], '._seed'),
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
