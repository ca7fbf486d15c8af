"""``model.safetensors``: write it, read it (never a pickle), and check it against the sha256 in ``config.json``.

Pickle weights (``.bin``/``.pth``/...) are refused unopened, because unpickling can run arbitrary code; they are
told apart from safetensors by their first bytes, not by their name.
"""
import hashlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import safetensors
import safetensors.torch
import torch

from ._errors import CorruptCheckpointError, UnsafeCheckpointError, one_line
from ._format import CONFIG_NAME, FORMAT_VERSION

PICKLE_SUFFIXES = ('.bin', '.pth', '.pt', '.pkl', '.pickle', '.ckpt', '.tar')


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
    where = where or str(path)
    path = Path(path)
    with open(path, 'rb') as f:
        head = f.read(9)
    if _looks_like_pickle(head, path.stat().st_size):
        raise UnsafeCheckpointError(f'{where}: {path.name} is a PyTorch pickle, not safetensors; it is refused '
                                    f'unopened. {_CONVERT_HINT}')
    try:
        with safetensors.safe_open(str(path), framework='pt') as f:
            list(f.keys())
    except Exception as e:   # safetensors raises its own SafetensorError (not a subclass of anything useful)
        raise CorruptCheckpointError(f'{where}: {path.name} is truncated or corrupted ({one_line(e)}); '
                                     f're-download it (force_download=True) or save the model again') from None
    if sha256 is not None:
        got = file_sha256(path)
        if got != sha256:
            raise CorruptCheckpointError(f'{where}: {path.name} has sha256 {got[:12]}..., but {CONFIG_NAME} recorded '
                                         f'{sha256[:12]}...: the file is corrupted or was replaced; re-download '
                                         f'it (force_download=True) or save the model again')
    try:
        return safetensors.torch.load_file(str(path), device='cpu')
    except Exception as e:
        raise CorruptCheckpointError(f'{where}: {path.name} cannot be read ({one_line(e)})') from None


def _looks_like_pickle(head: bytes, size: int) -> bool:
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

