"""HFF settings: one dataclass, validated once, serialised into ``config.json``.

Every constant of the formulation in ``shared/HFF.md`` is a field here, so a checkpoint's ``config.json`` is
enough to rebuild the stages and heads exactly.
"""
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Optional, Sequence, Tuple, Union

__all__ = ['AUX_KINDS', 'BALANCE_KINDS', 'EXIT_RULES', 'HFFConfig', 'MAX_INT', 'POOL_KINDS', 'PREDICT_KINDS',
           'PROTOTYPE_INITS', 'PredictFrom', 'printable_name', 'short_repr']

AUX_KINDS = ('none', 'conv1x1', 'conv3x3')
BALANCE_KINDS = ('memory', 'time', 'step')
POOL_KINDS = ('avg', 'token')
PROTOTYPE_INITS = ('normal', 'orthogonal')
PREDICT_KINDS = ('last', 'ensemble', 'adaptive')
EXIT_RULES = ('max_prob', 'entropy', 'patience')
# Widths, sizes, counts and indices: a setting beyond this builds no sensible model, only a huge allocation.
MAX_INT = 2 ** 16

PredictFrom = Union[str, int, Tuple[int, ...]]


@dataclass
class HFFConfig:
    """How a timm backbone is cut into stages and how each stage learns.

    Attributes:
        num_stages: Stages to cut when ``stage_indices`` is None. Hierarchical models get one stage per
            reduction level (the last ``num_stages`` levels; a stem tap joins stage 1); isotropic models (ViT)
            get ``num_stages`` evenly spaced blocks.
        balance: With ``stage_indices`` None, cut ``num_stages`` stages at block boundaries so that their saved
            activations ('memory': what bounds memory_efficient training), backbone times ('time') or whole training
            steps ('step': each stage's blocks and head, forward, backward and AdamW step: what paces a stage
            pipeline) are as equal as possible, instead of timm's one stage per level. Measured once at build time;
            the chosen cut is stored in ``stage_indices``. ``small_input`` adapts the stem of the default cut at
            the default stage count, so every balanced cut of a model, whatever ``num_stages``, re-cuts one network.
        balance_batch: The probe batch ``balance`` measures on; None: 2 ('memory': bytes scale with the batch), 4
            ('time'), 32 ('step'). ``hff-train`` sets the run's ``batch_size`` for 'step', since per-layer overheads
            weigh less at a larger batch and so move the cut.
        balance_channels_last: Measure 'time' and 'step' in channels_last memory format, as a run that trains in it
            (``hff-train`` sets the run's ``channels_last`` for 'step'): a CNN's early, wide-resolution blocks run at
            another speed there, which moves the cut.
        stage_indices: Where stages end: indices into the backbone's ``feature_info`` (``out_indices``-style, negative
            from the end) and/or module names of the backbone for cuts finer than timm's levels (block boundaries
            such as ``'layer1.0'`` or ``'stages.2.blocks.3'``). If the last cut is not the backbone's last tap, the
            backbone is truncated there and the tail is left unused.
        prototypes_per_class: K learned unit-norm prototypes per class, merged by a LogSumExp (a smooth max).
        embed_dim: Dimension of the sphere the stage output is projected to; None keeps the stage width.
        scale: Logit scale s (1 / temperature) of the cosine softmax.
        margin: Additive cosine margin m subtracted from the target class score during training.
        aux: Auxiliary block between an intermediate stage and its pooling ('none', 'conv1x1', 'conv3x3').
            A 1x1 conv + norm + ReLU is cheap and non-linear; 'none' makes the head pool-then-project.
            The last stage reuses the backbone's own head path (its pooling and head norm), so it has no aux.
        aux_channels: Width of the aux block; None keeps the stage width.
        aux_depth: Aux layers (conv + norm + activation) stacked in each intermediate head. Early stages learn
            better features when their local classifier is deeper (InfoPro, AugLocal use 2-3 layers).
        aux_size: Run the aux block on the stage output average-pooled to at most ``aux_size`` x ``aux_size``
            (NCHW / NHWC); None keeps the full resolution. A full-resolution stage's head then costs a fraction.
        pool: Pooling of intermediate stages: 'avg', or 'token' (the first prefix token of token models).
        pool_size: Intermediate heads pool to a ``pool_size`` x ``pool_size`` grid and flatten it before the
            projection (NCHW / NHWC), so an early stage is not asked for features that are already position-free;
            1 is global average pooling.
        prototype_init: 'normal' (random directions) or 'orthogonal' (orthonormal rows where possible).
        head: The head type of every stage (``timm_hff.heads.HEADS``; 'prototype': the hyperspherical prototype head
            above). A new head type registers itself there.
        predict_from: 'last', 'ensemble' (mean of all stages' log-probabilities), a stage index, a tuple of
            stage indices to ensemble, or 'adaptive'. An early stage index stops the forward there (early exit);
            'adaptive' lets each image leave at the first stage that is confident enough (``exit_rule``).
        exit_rule: How confident an image is after a stage, for ``predict_from='adaptive'``: 'max_prob' (the
            largest softmax probability), 'entropy' (``1 - H(p) / log C``), both in [0, 1] and compared with
            ``exit_thresholds``; or 'patience' (PABEE: the last ``exit_patience`` stages predict the same class).
        exit_thresholds: One confidence per stage except the last, in (0, 1]: an image leaves after stage k when
            its confidence is >= ``exit_thresholds[k]``; 1 never leaves there. Fitted on validation data by
            ``timm_hff.calibrate_exits``.
        exit_patience: Stages that must agree for the 'patience' rule (1 leaves after the first stage).
        small_input: Adapt a conv stem to 28-32 px inputs: strides before the first tap become 1 and
            pooling layers there become identities. Token models instead take timm's ``img_size`` and
            ``patch_size`` kwargs.
        check_img_size: Resolution of the build-time split check; None takes timm's ``img_size`` kwarg if
            given, else the model's default input size (32 with ``small_input``).
        check_split: Run the build-time checks (split equals ``forward_intermediates``, each parameter owned by
            at most one stage). Costs two forward passes on a batch of two.
    """
    num_stages: int = 4
    balance: Optional[str] = None
    balance_batch: Optional[int] = None
    balance_channels_last: bool = False
    stage_indices: Optional[Tuple[Union[int, str], ...]] = None
    prototypes_per_class: int = 1
    embed_dim: Optional[int] = 128
    scale: float = 16.0
    margin: float = 0.2
    aux: str = 'conv1x1'
    aux_channels: Optional[int] = None
    aux_depth: int = 1
    aux_size: Optional[int] = None
    pool: str = 'avg'
    pool_size: int = 1
    prototype_init: str = 'normal'
    head: str = 'prototype'
    predict_from: PredictFrom = 'last'
    exit_rule: str = 'max_prob'
    exit_thresholds: Optional[Tuple[float, ...]] = None
    exit_patience: int = 2
    small_input: bool = False
    check_img_size: Optional[int] = None
    check_split: bool = True

    def __post_init__(self):
        if isinstance(self.stage_indices, (list, tuple)):
            self.stage_indices = tuple(i if isinstance(i, str) else _as_index(i) for i in self.stage_indices)
        if isinstance(self.predict_from, (list, tuple)):
            self.predict_from = tuple(_as_index(i) for i in self.predict_from)
        if isinstance(self.exit_thresholds, (list, tuple)):
            self.exit_thresholds = tuple(float(t) if isinstance(t, int) and not isinstance(t, bool) and abs(t) <= 1
                                         else t for t in self.exit_thresholds)
        self.validate()

    def validate(self) -> None:
        """Check types and ranges; raises ValueError with one line naming the field and the fix."""
        _check_int('num_stages', self.num_stages, 1)
        _check_int('prototypes_per_class', self.prototypes_per_class, 1)
        if self.embed_dim is not None:
            _check_int('embed_dim', self.embed_dim, 1)
        if self.aux_channels is not None:
            _check_int('aux_channels', self.aux_channels, 1)
        _check_int('aux_depth', self.aux_depth, 1)
        if self.aux_size is not None:
            _check_int('aux_size', self.aux_size, 1)
        _check_int('pool_size', self.pool_size, 1)
        if self.balance_batch is not None:
            _check_int('balance_batch', self.balance_batch, 1)
        if not isinstance(self.balance_channels_last, bool):
            raise ValueError(f'balance_channels_last must be true or false, got '
                             f'{short_repr(self.balance_channels_last)}')
        if self.aux == 'none' and (self.aux_channels is not None or self.aux_depth != 1 or self.aux_size is not None):
            given = [k for k, v in (('aux_channels', self.aux_channels), ('aux_size', self.aux_size)) if v is not None]
            given += ['aux_depth'] if self.aux_depth != 1 else []
            raise ValueError(f"{', '.join(given)} shape the aux block, but aux='none' has none; drop them or choose "
                             f"aux='conv1x1' / 'conv3x3'")
        if not isinstance(self.head, str) or not self.head.isidentifier():
            raise ValueError(f"head must name a head type (e.g. 'prototype'), got {short_repr(self.head)}")
        if self.check_img_size is not None:
            _check_int('check_img_size', self.check_img_size, 1)
        if self.stage_indices is not None:
            if not isinstance(self.stage_indices, tuple) or len(self.stage_indices) == 0:
                raise ValueError(f'stage_indices must be a non-empty list of feature_info indices or module names, '
                                 f'got {self.stage_indices!r}; or None for the default cut')
            for i in self.stage_indices:
                if isinstance(i, bool) or not isinstance(i, (int, str)):
                    raise ValueError(f'stage_indices entries are feature_info indices (integers) or module names '
                                     f'(strings), got {short_repr(i)}')
                if isinstance(i, str) and not i.strip():
                    raise ValueError('stage_indices holds an empty module name; name a block such as \'layer1.0\'')
                if isinstance(i, str) and (len(i) > 256 or not i.isprintable()):
                    raise ValueError(f'stage_indices holds {short_repr(i)}, which is no module name')
                if isinstance(i, int):
                    _check_int('stage_indices entries', i, -MAX_INT, MAX_INT)
        if not _is_number(self.scale) or not self.scale > 0:
            raise ValueError(f'scale must be a positive number (1 / temperature), got {short_repr(self.scale)}')
        if not _is_number(self.margin) or not 0 <= self.margin < 2:
            raise ValueError(f'margin must be a cosine margin in [0, 2), got {short_repr(self.margin)}')
        if self.balance is not None:
            _check_choice('balance', self.balance, BALANCE_KINDS)
        _check_choice('aux', self.aux, AUX_KINDS)
        _check_choice('pool', self.pool, POOL_KINDS)
        _check_choice('prototype_init', self.prototype_init, PROTOTYPE_INITS)
        if isinstance(self.predict_from, str):
            _check_choice('predict_from', self.predict_from, PREDICT_KINDS)
        elif isinstance(self.predict_from, tuple):
            if not self.predict_from:
                raise ValueError('predict_from is an empty tuple; give stage indices, "last" or "ensemble"')
            for i in self.predict_from:
                _check_int('each stage index in predict_from', i, -MAX_INT, MAX_INT)
        elif not isinstance(self.predict_from, int) or isinstance(self.predict_from, bool):
            raise ValueError(f"predict_from must be 'last', 'ensemble', 'adaptive', a stage index or a tuple of "
                             f"them, got {short_repr(self.predict_from)}")
        else:
            _check_int('predict_from', self.predict_from, -MAX_INT, MAX_INT)
        _check_choice('exit_rule', self.exit_rule, EXIT_RULES)
        _check_int('exit_patience', self.exit_patience, 1)
        if self.exit_thresholds is not None:
            ok = isinstance(self.exit_thresholds, tuple) and all(
                isinstance(t, float) and 0 < t <= 1 for t in self.exit_thresholds)
            if not ok:
                raise ValueError(f'exit_thresholds must be confidences in (0, 1], one per stage except the last '
                                 f'(1: never exit there), got {short_repr(self.exit_thresholds)}; fit them with '
                                 f'timm_hff.calibrate_exits')

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> 'HFFConfig':
        """Build from a (possibly untrusted) dict; unknown keys are an error, not silently dropped."""
        if not isinstance(d, dict):
            raise ValueError(f'HFF config must be a mapping, got {type(d).__name__}')
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(map(str, d)) - known)
        if unknown:
            raise ValueError(f'unknown HFF setting(s) {short_repr(unknown)}; known settings are {sorted(known)}')
        return cls(**d)

    @classmethod
    def split_kwargs(cls, kwargs: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """Split ``create_model`` kwargs into (HFF settings, timm kwargs)."""
        known = {f.name for f in fields(cls)}
        hff = {k: v for k, v in kwargs.items() if k in known}
        rest = {k: v for k, v in kwargs.items() if k not in known}
        return hff, rest


def _as_index(i: Any) -> Any:
    """An integer index as int (3.0 from JSON too); anything else is left for ``validate`` to refuse."""
    if isinstance(i, bool):
        return i
    if isinstance(i, float) and i.is_integer():
        return int(i)
    return i


def _check_int(name: str, value: Any, minimum: int, maximum: int = MAX_INT) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f'{name} must be an integer >= {minimum}, got {short_repr(value)}')
    if value > maximum:
        raise ValueError(f'{name} must be an integer <= {maximum}, got {short_repr(value)}')


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f'{name} must be one of {list(choices)}, got {short_repr(value)}')


def short_repr(value: Any, width: int = 60) -> str:
    """The repr an error message quotes, cut to ``width`` characters, so that a junk value keeps the message short."""
    try:
        text = repr(value)
    except ValueError:   # an integer too long to print
        text = f'<an integer of {value.bit_length()} bits>'
    return text if len(text) <= width else text[:width - 3] + '...'


def printable_name(text: str, width: int = 120) -> str:
    """A user-given name as an error quotes it: as written when printable and short, else its (cut) repr, so that a
    newline or control character in a name never splits the one-line message."""
    return text if text.isprintable() and len(text) <= width else short_repr(text, width)
