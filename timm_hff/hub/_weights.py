"""``model.safetensors``: write it, read its header and tensors (never a pickle), check it against ``config.json``.

Pickle weights (``.bin``/``.pth``/...) are refused unopened, because unpickling can run arbitrary code; they are
told apart from safetensors by their first bytes, not by their name. The header is read before any tensor: it is
the one trustworthy size of a saved model (``_dry_build`` holds the config against it).
"""
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import safetensors
import safetensors.torch
import torch

from ._errors import CorruptCheckpointError, UnsafeCheckpointError, one_line
from ._format import CONFIG_NAME, FORMAT_VERSION

__all__ = ['DTYPE_BYTES', 'FLOAT_DTYPES', 'Header', 'MAX_HEADER_BYTES', 'PICKLE_SUFFIXES', 'check_weights',
           'file_sha256', 'load_weights', 'looks_like_pickle', 'pickle_names', 'read_weights', 'state_tensors',
           'unsafe_error', 'write_weights']

PICKLE_SUFFIXES = ('.bin', '.pth', '.pt', '.pkl', '.pickle', '.ckpt', '.tar')
MAX_HEADER_BYTES = 64 * 2 ** 20     # ~100 bytes a tensor: room for half a million tensors
# safetensors' dtypes that torch reads, and their sizes
DTYPE_BYTES = {'BOOL': 1, 'U8': 1, 'I8': 1, 'I16': 2, 'U16': 2, 'I32': 4, 'U32': 4, 'I64': 8, 'U64': 8, 'F16': 2,
               'BF16': 2, 'F32': 4, 'F64': 8, 'F8_E4M3': 1, 'F8_E5M2': 1}
FLOAT_DTYPES = ('F16', 'BF16', 'F32', 'F64')


@dataclass
class Header:
    """A checked safetensors header: tensor name -> (dtype name, shape), and the bytes of tensor data it tiles."""
    tensors: Dict[str, Tuple[str, Tuple[int, ...]]]
    data_bytes: int


def state_tensors(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The model's state_dict as contiguous CPU copies, ready to write."""
    return {k: v.detach().to('cpu', copy=True).contiguous() for k, v in model.state_dict().items()}


def write_weights(tensors: Dict[str, torch.Tensor], path: Path) -> str:
    """Write ``tensors`` as safetensors at ``path`` and return the file's sha256 (recorded in ``config.json``)."""
    safetensors.torch.save_file(tensors, str(path), metadata={'format': 'pt', 'hff_format': str(FORMAT_VERSION)})
    return file_sha256(path)


def file_sha256(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def read_weights(path: Path, sha256: Optional[str] = None, where: str = '') -> Dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file (never a pickle), checking its structure and, if known, its checksum."""
    check_weights(path, sha256, where)
    return load_weights(path, where)


def check_weights(path: Path, sha256: Optional[str] = None, where: str = '') -> 'Header':
    """What a ``.safetensors`` file holds (names, dtypes, shapes), read from its header without loading a tensor.

    Refuses a pickle unopened, a header that is not safetensors' (truncated, overlapping or uncovered offsets,
    unknown dtypes, shapes the file is too small to hold: safetensors checks that the offsets tile the file
    exactly), and, with ``sha256``, a file that differs from the checksum in ``config.json``.
    """
    where = where or str(path)
    path = Path(path)
    size = path.stat().st_size
    with open(path, 'rb') as f:
        head = f.read(9)
    if looks_like_pickle(head, size):
        raise UnsafeCheckpointError(f'{where}: {path.name} is a PyTorch pickle, not safetensors; it is refused '
                                    f'unopened. {_CONVERT_HINT}')
    header_len = int.from_bytes(head[:8], 'little') if len(head) >= 8 else -1
    if not 2 <= header_len <= min(size - 8, MAX_HEADER_BYTES):
        raise CorruptCheckpointError(f'{where}: {path.name} is truncated or corrupted (its header claims '
                                     f'{header_len} bytes in a file of {size}); re-download it (force_download=True) '
                                     f'or save the model again')
    tensors = {}
    try:
        with safetensors.safe_open(str(path), framework='pt') as f:
            for name in f.keys():
                info = f.get_slice(name)
                tensors[name] = (info.get_dtype(), tuple(int(d) for d in info.get_shape()))
    except Exception as e:   # safetensors raises its own SafetensorError (not a subclass of anything useful)
        raise CorruptCheckpointError(f'{where}: {path.name} is truncated or corrupted ({one_line(e)[:200]}); '
                                     f're-download it (force_download=True) or save the model again') from None
    unknown = sorted({d for d, _ in tensors.values()} - set(DTYPE_BYTES))
    if unknown:
        raise CorruptCheckpointError(f'{where}: {path.name} holds tensors of dtype {unknown[0][:20]!r}, which a '
                                     f'saved HFF model never has (expected one of {sorted(DTYPE_BYTES)})')
    if sha256 is not None:
        got = file_sha256(path)
        if got != sha256:
            raise CorruptCheckpointError(f'{where}: {path.name} has sha256 {got[:12]}..., but {CONFIG_NAME} recorded '
                                         f'{sha256[:12]}...: the file is corrupted or was replaced; re-download '
                                         f'it (force_download=True) or save the model again')
    return Header(tensors, size - 8 - header_len)


def load_weights(path: Path, where: str = '') -> Dict[str, torch.Tensor]:
    """The tensors of a file ``check_weights`` accepted: as many bytes as its header names, no more."""
    try:
        return safetensors.torch.load_file(str(path), device='cpu')
    except Exception as e:
        raise CorruptCheckpointError(f'{where or path}: {Path(path).name} cannot be read ({one_line(e)[:200]})'
                                     ) from None


def looks_like_pickle(head: bytes, size: int) -> bool:
    """A torch.save zip (``PK``) or a bare pickle (``\\x80`` + protocol 2-5), told apart from safetensors, whose
    8-byte little-endian header length (its first byte can be 0x80) is followed by the JSON header's ``{``."""
    if len(head) >= 9 and head[8:9] == b'{' and int.from_bytes(head[:8], 'little') <= size - 8:
        return False
    return head[:2] == b'PK' or (head[:1] == b'\x80' and head[1:2] in (b'\x02', b'\x03', b'\x04', b'\x05'))


_CONVERT_HINT = ("Convert it once, in a trusted environment: python -c \"import torch, safetensors.torch as st; "
                 "st.save_file(torch.load('<file>', weights_only=True), 'model.safetensors')\"")


def pickle_names(names: Sequence[str]) -> List[str]:
    return sorted(n for n in names if n.lower().endswith(PICKLE_SUFFIXES))


def unsafe_error(where: str, pickles: Sequence[str]) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(f'{where} holds only pickle weights ({", ".join(pickles)}), which timm_hff never '
                                 f'loads because unpickling can run arbitrary code. {_CONVERT_HINT}')

