"""Point-to-point traffic between stage processes: stage outputs forward, small control messages through rank 0.

Stage k's output travels to stage k+1 only (``torch.distributed`` ``isend`` / ``irecv``; nothing travels back). Both
ends know every message's tensors in advance (shapes from a probe, batch sizes from the data plan), so a receiver
posts its receives ahead and a sender keeps its sends in flight: at most ``depth`` messages each way, which bounds
memory and lets the transfers run while both processes compute.

Every wait has a timeout, and a failed or timed-out wait becomes one ``PeerLost`` line naming the rank it waited
for: a dead process closes its connections (noticed at once), a hung one is noticed after ``timeout`` seconds.
Control messages (plans, metrics, checkpoint hand-shakes, the final weights) go through rank 0 over point-to-point
too, never a collective, so a failure is always pinned on one rank.
"""
import pickle
from collections import deque
from datetime import timedelta
from typing import Any, Deque, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .part import TensorSpec

__all__ = ['Control', 'Inbox', 'Outbox', 'PeerLost', 'lost_message', 'who']


class PeerLost(ConnectionError):
    """Another stage process died, hung or failed; the message names its rank."""


def who(rank: int) -> str:
    return f'rank {rank} (stage {rank + 1})'


class _Link:
    def __init__(self, peer: int, timeout: float, group=None, device='cpu'):
        self.peer, self.timeout, self.group, self.device = peer, timeout, group, device

    def wait(self, works, what: str) -> None:
        try:
            for w in works:
                w.wait(timedelta(seconds=self.timeout))
        except RuntimeError as e:   # gloo / NCCL: connection closed, reset or timed out
            raise PeerLost(lost_message(self.peer, e, what, self.timeout)) from None


def lost_message(peer: int, e: BaseException, what: str, timeout: float) -> str:
    text = str(e)
    if 'imed out' in text or 'timeout' in text.lower():
        why = f'did not answer within {timeout:g} s (stage_parallel_timeout)'
    elif 'closed' in text or 'reset' in text.lower() or 'refused' in text.lower() or 'broken pipe' in text.lower():
        why = 'stopped (its process exited or was killed; see its own output)'
    else:
        why = f'failed ({text.strip().splitlines()[0][:200] if text.strip() else type(e).__name__})'
    return f'stage-parallel {who(peer)} {why} while {what}'


class Outbox(_Link):
    """Sends to the next stage's process; at most ``depth`` messages in flight."""

    def __init__(self, peer: int, depth: int, timeout: float, group=None, device='cpu'):
        super().__init__(peer, timeout, group, device)
        self.depth = depth
        self.inflight: Deque[Tuple[list, list, str]] = deque()

    def send(self, specs: Sequence[TensorSpec], tensors: Sequence[torch.Tensor], batch: int, what: str) -> None:
        flats, strides = [], []
        for spec, t in zip(specs, tensors):
            if tuple(t.shape) != (batch,) + spec.shape:
                raise RuntimeError(f'stage output of shape {tuple(t.shape)} does not match the planned '
                                   f'{(batch,) + spec.shape} ({what})')
            flat, st = spec.wire(t)
            flats.append(flat)
            strides.append(st)
        wires = [torch.cat(strides).to(self.device)] + flats   # a small header: each tensor's strides
        while len(self.inflight) >= self.depth:
            self._wait_oldest()
        try:
            works = dist.batch_isend_irecv([dist.P2POp(dist.isend, w, self.peer, self.group) for w in wires])
        except RuntimeError as e:
            raise PeerLost(lost_message(self.peer, e, what, self.timeout)) from None
        self.inflight.append((works, wires, what))   # the buffers live until their sends are done

    def _wait_oldest(self) -> None:
        works, _, what = self.inflight.popleft()
        self.wait(works, what)

    def flush(self) -> None:
        while self.inflight:
            self._wait_oldest()


class Inbox(_Link):
    """Receives from the previous stage's process, ``depth`` messages posted ahead."""

    def __init__(self, peer: int, depth: int, timeout: float, group=None, device='cpu'):
        super().__init__(peer, timeout, group, device)
        self.depth = depth

    def stream(self, specs: Sequence[TensorSpec], batches: Sequence[int], what: str) -> Iterator[List[torch.Tensor]]:
        """The messages of one phase (one per batch size in ``batches``), in order, each as its tensors."""
        pending: Deque[Tuple[list, list, int, int]] = deque()
        todo = iter(enumerate(batches))

        def post() -> None:
            nxt = next(todo, None)
            if nxt is None:
                return
            i, b = nxt
            bufs = [torch.empty(sum(1 + len(s.shape) for s in specs), dtype=torch.int64, device=self.device)]
            bufs += [torch.empty(s.numel(b), dtype=s.dtype, device=self.device) for s in specs]
            try:
                works = dist.batch_isend_irecv([dist.P2POp(dist.irecv, buf, self.peer, self.group) for buf in bufs])
            except RuntimeError as e:
                raise PeerLost(lost_message(self.peer, e, f'sending {what}, message {i + 1}', self.timeout)) from None
            pending.append((works, bufs, i, b))

        for _ in range(self.depth):
            post()
        while pending:
            works, bufs, i, b = pending.popleft()
            self.wait(works, f'sending {what}, message {i + 1} of {len(batches)}')
            post()
            header, out, at = bufs[0].tolist(), [], 0
            for s, flat in zip(specs, bufs[1:]):
                out.append(s.unwire(flat, header[at:at + 1 + len(s.shape)], b))
                at += 1 + len(s.shape)
            yield out


# ----- control messages, through rank 0 -----
class Control:
    """Small Python objects between rank 0 and every other rank (point to point, with the timeout)."""

    def __init__(self, rank: int, world: int, timeout: float, group=None):
        self.rank, self.world, self.timeout, self.group = rank, world, timeout, group

    def _send(self, obj: Any, peer: int, what: str) -> None:
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.int64)
        link = _Link(peer, self.timeout, self.group)
        try:
            link.wait([dist.isend(size, peer, self.group)], what)
            link.wait([dist.isend(data, peer, self.group)], what)
        except RuntimeError as e:
            raise PeerLost(lost_message(peer, e, what, self.timeout)) from None

    def _recv(self, peer: int, what: str) -> Any:
        size = torch.zeros(1, dtype=torch.int64)
        link = _Link(peer, self.timeout, self.group)
        try:
            link.wait([dist.irecv(size, peer, self.group)], what)
            data = torch.empty(int(size.item()), dtype=torch.uint8)
            link.wait([dist.irecv(data, peer, self.group)], what)
        except RuntimeError as e:
            raise PeerLost(lost_message(peer, e, what, self.timeout)) from None
        return pickle.loads(data.numpy().tobytes())

    def gather(self, obj: Any, what: str) -> Optional[List[Any]]:
        """Every rank's ``obj`` on rank 0 (in rank order); None elsewhere."""
        if self.rank != 0:
            self._send(obj, 0, what)
            return None
        return [obj] + [self._recv(r, what) for r in range(1, self.world)]

    def broadcast(self, obj: Any, what: str, src: int = 0) -> Any:
        """``obj`` of rank ``src`` on every rank (relayed by rank 0 when ``src`` is another rank)."""
        if src != 0:
            if self.rank == src:
                self._send(obj, 0, what)
            elif self.rank == 0:
                obj = self._recv(src, what)
        if self.rank == 0:
            for r in range(1, self.world):
                if r != src:
                    self._send(obj, r, what)
            return obj
        return obj if self.rank == src else self._recv(0, what)

    def all_gather(self, obj: Any, what: str) -> List[Any]:
        return self.broadcast(self.gather(obj, what), what)

    def barrier(self, what: str) -> None:
        self.all_gather(None, what)
