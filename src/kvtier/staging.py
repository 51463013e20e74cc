"""Device staging buffers passed between a work stream and a copy stream (``StagingRing``).

Used by ``kvtier.datapath.ChunkMover`` and the transformers integration: kernels (gathers, scatters,
quantisation) run on a work stream, host<->device copies on a copy stream, and CUDA events order
the two stages of one buffer and its reuse.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class StagingRing:
    """Device staging buffers passed between a work stream and a copy stream, for one device.

    Every transfer takes the next buffer of the ring and runs in two stages: on the way to the host,
    ``produce(buffer)`` (kernels: gathers) on the work stream, then ``transfer(buffer)`` (the DMA
    copy) on the copy stream; on the way in, ``transfer`` on the copy stream, then ``consume`` on
    the work stream. CUDA events order the two stages of one buffer and its reuse, so with two or
    more buffers the copy of one transfer overlaps the kernels of the next. Nothing here blocks the
    CPU except ``wait``.

    Single-threaded: one thread (the one that owns the engine's stream) calls every method. The
    callables run immediately, under the stream they are given; they must only queue work on the
    current stream. On a CPU device there are no streams: both stages run at once, in order.
    """

    def __init__(self, device: torch.device, buffer_bytes: int, num_buffers: int) -> None:
        if num_buffers < 1 or buffer_bytes < 1:
            raise ValueError(f"a staging ring needs buffers, got {num_buffers} of {buffer_bytes} bytes")
        self.device = device
        self.buffer_bytes = buffer_bytes
        self._buffers = [torch.empty(buffer_bytes, dtype=torch.uint8, device=device) for _ in range(num_buffers)]
        self._next = 0
        self._is_cuda = device.type == "cuda"
        if self._is_cuda:
            self.work_stream = torch.cuda.Stream(device)
            self.copy_stream = torch.cuda.Stream(device)
            self._ready = [torch.cuda.Event() for _ in range(num_buffers)]
            self._free = [torch.cuda.Event() for _ in range(num_buffers)]

    def begin(self) -> None:
        """Order both streams after the work queued so far on the caller's current stream (the
        engine's forward), so that transfers see the KV it wrote. Call before a batch."""
        if self._is_cuda:
            current = torch.cuda.current_stream(self.device)
            self.work_stream.wait_stream(current)
            self.copy_stream.wait_stream(current)

    def to_host(self, produce: Callable[[torch.Tensor], None], transfer: Callable[[torch.Tensor], None]) -> None:
        """Queue ``produce`` (work stream) then ``transfer`` (copy stream) on the next buffer."""
        index, buffer = self._take()
        if not self._is_cuda:
            produce(buffer)
            transfer(buffer)
            return
        self._stage(self.work_stream, self._free[index], produce, buffer, self._ready[index])
        self._stage(self.copy_stream, self._ready[index], transfer, buffer, self._free[index])

    def from_host(self, transfer: Callable[[torch.Tensor], None], consume: Callable[[torch.Tensor], None]) -> None:
        """Queue ``transfer`` (copy stream) then ``consume`` (work stream) on the next buffer."""
        index, buffer = self._take()
        if not self._is_cuda:
            transfer(buffer)
            consume(buffer)
            return
        self._stage(self.copy_stream, self._free[index], transfer, buffer, self._ready[index])
        self._stage(self.work_stream, self._ready[index], consume, buffer, self._free[index])

    def mark(self) -> torch.cuda.Event | None:
        """An event recorded on the work stream after everything queued so far (None on CPU,
        where everything queued is already done)."""
        if not self._is_cuda:
            return None
        event = torch.cuda.Event()
        event.record(self.work_stream)
        return event

    def mark_copies(self) -> torch.cuda.Event | None:
        """An event recorded on the copy stream after everything queued so far: once it completes,
        every ``transfer`` queued so far (device->host copies included) is done. None on CPU."""
        if not self._is_cuda:
            return None
        event = torch.cuda.Event()
        event.record(self.copy_stream)
        return event

    def fence(self) -> None:
        """Make the caller's current stream wait (on the device, not the CPU) for the work stream:
        work queued after this call sees the result of every ``consume`` (and ``produce``) queued
        so far. Copies to the host still in flight are not waited for."""
        if self._is_cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.work_stream)

    def wait(self) -> None:
        """Block the CPU until everything queued so far is done."""
        if self._is_cuda:
            self.work_stream.synchronize()
            self.copy_stream.synchronize()

    def _take(self) -> tuple[int, torch.Tensor]:
        index = self._next
        self._next = (index + 1) % len(self._buffers)
        return index, self._buffers[index]

    @staticmethod
    def _stage(stream: torch.cuda.Stream, after: torch.cuda.Event, work: Callable[[torch.Tensor], None],
               buffer: torch.Tensor, done: torch.cuda.Event) -> None:
        with torch.cuda.stream(stream):
            stream.wait_event(after)  # a no-op for an event never recorded
            work(buffer)
            done.record(stream)
