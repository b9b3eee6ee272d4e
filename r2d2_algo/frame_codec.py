"""Compressed observation storage for the sequence replay (issue #28): chunks of consecutive
frames of one env stream, compressed by the stream's writer, decompressed by the sampler.

Layout, per env stream (all arrays allocated through the replay's ``allocate``, so that they can
live in shared memory written by actor processes while the learner samples):

- Frames are numbered f = 0, 1, ... in the order they are written. Chunk c holds frames
  [cK, cK + K), K = ``frames_per_chunk``. The replay numbers step i's frame f = i + h
  (h = frame_stack − 1), so that frames 0..h−1, the history before a stream's first step, are
  zero frames, and a window's first frame (its history included) begins a chunk whenever K
  divides the sequence period.
- ``staging`` keeps the newest R frames raw, frame f at f % R (R a multiple of K, at least
  K + the overwrite margin): the writer compresses a chunk from there once its last frame is
  written, and readers take the frames of the chunk that is not complete yet from there, so
  that every window the uncompressed replay can sample can be sampled here too.
- ``arena`` is a byte ring of A = bytes-per-frame budget × frames per stream. A complete chunk's
  compressed bytes are placed at the next absolute byte offset o (position o % A); a chunk never
  wraps round the ring's end: one that would is placed at the start of the next lap, the tail
  left unused. ``chunk_offset`` and ``chunk_nbytes`` give chunk c's o and length at table slot
  c % N. ``arena_head`` is the absolute end of the bytes reserved so far.
- Write order, as for the replay's ``write_count``: a writer publishes ``arena_head`` (the
  bytes it is about to write) first, then writes the bytes, then the chunk's table slot; the
  replay publishes the step (``write_count``) last. A chunk is intact as long as o ≥
  arena_head − A: no later chunk's bytes, written or being written, reach its bytes.

No locks: each stream has one writer; a reader checks after it has read a window whether any of
the bytes it read could have been overwritten meanwhile (``CompressedFrames.intact``).

The codec is a well-kept library's (python-zstandard, python-lz4), whose calls release the GIL,
so several sampling threads decompress in parallel. Measured on the frames of four Atari games
(benchmarks/bench_compression.py): zstd level 1 over chunks of 16–20 frames stores 40–200 bytes
per 84 × 84 frame (7,056 raw) at 2–5 µs per frame to compress and 1–2 µs to decompress.
"""

from __future__ import annotations

import threading
from typing import Callable

import numpy as np

CODECS = ("zstd", "lz4")  # zstd takes a level: "zstd:3"; "zstd" is level 1
INTACT = np.iinfo(np.int64).max  # a receipt entry for a window that read nothing of that kind


class ChunkError(ValueError):
    """Bytes that do not decompress into one whole chunk (overwritten while they were read, or corrupt)."""


def frames_per_chunk_for(period: int, most: int = 32) -> int:
    """Default chunk length K: the largest divisor of the sequence period P that is ≤ ``most``,
    so that every window begins a chunk (paper P = 40: K = 20; a paper window of 3 + 125 frames
    then decompresses 7 chunks = 140 frames)."""
    return max(k for k in range(1, min(period, most) + 1) if period % k == 0)


class FrameCodec:
    """Lossless byte codec by name: ``"zstd"`` (zstandard level 1), ``"zstd:N"`` (level N),
    ``"lz4"`` (lz4 block format, default mode). One compression and one decompression context per
    thread (zstandard's contexts must not be shared by threads).

    Raises:
        ValueError: an unknown codec name or level.
    """

    def __init__(self, name: str):
        kind, _, level = name.partition(":")
        if kind not in CODECS or (level and (kind != "zstd" or not level.lstrip("-").isdigit())):
            raise ValueError(f"unknown replay compression {name!r}: use one of {', '.join(CODECS)} "
                             f"(zstd takes a level, as in zstd:3)")
        self.name, self.kind, self.level = name, kind, int(level or 1)
        self._local = threading.local()
        if kind == "zstd":
            import zstandard

            self._zstd = zstandard
        else:
            import lz4.block

            self._lz4 = lz4.block

    def bound(self, nbytes: int) -> int:
        """Most bytes ``compress`` can return for ``nbytes`` bytes (the libraries' compress bounds)."""
        if self.kind == "zstd":  # ZSTD_COMPRESSBOUND, plus the frame header
            return nbytes + (nbytes >> 8) + (((128 << 10) - nbytes) >> 11 if nbytes < 128 << 10 else 0) + 32
        return nbytes + nbytes // 255 + 16  # LZ4_COMPRESSBOUND

    def compress(self, data) -> bytes:
        """Compress a C-contiguous buffer (numpy array, bytes)."""
        if self.kind == "lz4":
            return self._lz4.compress(data, store_size=False)
        context = getattr(self._local, "compressor", None)
        if context is None:
            context = self._local.compressor = self._zstd.ZstdCompressor(level=self.level, write_checksum=False)
        return context.compress(data)

    def decompress(self, data, nbytes: int) -> bytes:
        """Decompress ``data`` (any buffer) into exactly ``nbytes`` bytes.

        Raises:
            ChunkError: the bytes are not one compressed chunk of ``nbytes`` bytes.
        """
        try:
            if self.kind == "lz4":
                out = self._lz4.decompress(data, uncompressed_size=nbytes)
            else:
                context = getattr(self._local, "decompressor", None)
                if context is None:
                    context = self._local.decompressor = self._zstd.ZstdDecompressor()
                out = context.decompress(data, max_output_size=nbytes)
        except Exception as e:  # noqa: BLE001 - each library raises its own error type for bad input
            raise ChunkError(f"{self.name}: {e}") from None
        if len(out) != nbytes:
            raise ChunkError(f"{self.name}: {len(out)} bytes decompressed, {nbytes} expected")
        return out

    def decompress_into(self, data, out: np.ndarray) -> None:
        """Decompress ``data`` into ``out``, a C-contiguous array of exactly the decompressed size.
        zstd writes there directly: no new buffer per call (a chunk's 141 kB, above malloc's mmap
        threshold, would otherwise be mapped and faulted in afresh each time).

        Raises:
            ChunkError: the bytes are not one compressed chunk of ``out.nbytes`` bytes.
        """
        if self.kind == "lz4":
            out.reshape(-1).view(np.uint8)[:] = np.frombuffer(self.decompress(data, out.nbytes), np.uint8)
            return
        context = getattr(self._local, "decompressor", None)
        if context is None:
            context = self._local.decompressor = self._zstd.ZstdDecompressor()
        target = memoryview(out.reshape(-1).view(np.uint8))
        try:
            with context.stream_reader(data, read_across_frames=False) as reader:
                count = reader.readinto(target)
                while 0 < count < out.nbytes:  # a reader may stop early at its input's end
                    step = reader.readinto(target[count:])
                    if step == 0:
                        break
                    count += step
                if count == out.nbytes and reader.read(1):
                    count += 1  # the frame holds more
        except Exception as e:  # noqa: BLE001 - the library's own error type for bad input
            raise ChunkError(f"{self.name}: {e}") from None
        if count != out.nbytes:
            raise ChunkError(f"{self.name}: {'more than ' if count > out.nbytes else ''}{min(count, out.nbytes)} bytes "
                             f"decompressed, {out.nbytes} expected")


class CompressedFrames:
    """The compressed frame store of ``num_streams`` streams (module docstring for the layout).

    Args:
        num_streams: E, env streams; each has one writer.
        frames_per_stream: C, frames a stream's window of steps spans (the replay's capacity per
            stream); the arena holds C × ``bytes_per_frame`` bytes per stream.
        frame_shape, dtype: one stored frame (Atari: (84, 84) uint8).
        codec: a FrameCodec.
        frames_per_chunk: K.
        bytes_per_frame: the arena's budget in compressed bytes per frame; data that compress
            worse push the oldest chunks out before their steps leave the replay.
        overwrite_margin: the replay's (steps), so that the staging ring keeps raw frames at
            least that many steps after their chunk is complete.
        first_frame: the first frame a stream's writer writes (the replay's h); the frames
            before it are zero frames, compressed with the first write.
        allocate: ``allocate(name, shape, dtype) -> ndarray`` (zero-filled).
    Shared arrays (``ARRAYS``, the names given to ``allocate``):
        obs_staging: (E, R, *frame_shape) dtype; obs_arena: (E, A) uint8;
        obs_chunk_offset, obs_chunk_nbytes: (E, N) int64, N = C // K + 2 table slots;
        obs_arena_head: (E,) int64.
    Raises:
        ValueError: K < 1, a budget < 1, or an arena that cannot hold one incompressible chunk.
    """

    ARRAYS = ("obs_staging", "obs_arena", "obs_chunk_offset", "obs_chunk_nbytes", "obs_arena_head")

    def __init__(self, num_streams: int, frames_per_stream: int, frame_shape: tuple[int, ...], dtype,
                 codec: FrameCodec, frames_per_chunk: int, bytes_per_frame: int, overwrite_margin: int,
                 first_frame: int, allocate: Callable[[str, tuple[int, ...], object], np.ndarray]):
        if frames_per_chunk < 1:
            raise ValueError(f"frames_per_chunk must be >= 1, got {frames_per_chunk}")
        if bytes_per_frame < 1:
            raise ValueError(f"compressed_bytes_per_frame must be >= 1, got {bytes_per_frame}")
        E, C, K = num_streams, frames_per_stream, frames_per_chunk
        self.codec, self.frames_per_chunk, self.bytes_per_frame, self.first_frame = codec, K, bytes_per_frame, first_frame
        self.frame_shape, self.dtype = tuple(frame_shape), np.dtype(dtype)
        self.frame_nbytes = int(np.prod(self.frame_shape, dtype=np.int64)) * self.dtype.itemsize
        self.chunk_nbytes_raw = K * self.frame_nbytes
        self.staging_frames = K * -(-(K + overwrite_margin) // K)  # R
        self.arena_nbytes = bytes_per_frame * C  # A
        self.table_slots = C // K + 2  # N: every chunk with a frame among the newest C, and one more
        if self.arena_nbytes < codec.bound(self.chunk_nbytes_raw):
            raise ValueError(
                f"--compressed-bytes-per-frame {bytes_per_frame} × {C} frames per stream = {self.arena_nbytes:,} "
                f"bytes per stream cannot hold one chunk of {K} frames ({codec.bound(self.chunk_nbytes_raw):,} "
                f"bytes at worst): raise it, or --buffer-size")
        self.staging = allocate("obs_staging", (E, self.staging_frames, *self.frame_shape), self.dtype)
        self.arena = allocate("obs_arena", (E, self.arena_nbytes), np.uint8)
        self.chunk_offset = allocate("obs_chunk_offset", (E, self.table_slots), np.int64)
        self.chunk_nbytes = allocate("obs_chunk_nbytes", (E, self.table_slots), np.int64)
        self.arena_head = allocate("obs_arena_head", (E,), np.int64)

    # ------------------------------------------------------------------ writing
    def write(self, streams: np.ndarray, frame_index: np.ndarray, frames: np.ndarray) -> None:
        """Frame ``frame_index`` (K,) of each of ``streams`` (K,) is ``frames`` (K, *frame_shape);
        a stream's frames come in order, from its one writer. Chunks completed by these frames are
        compressed into the arena and published before this returns (the caller then publishes
        the step)."""
        K, R = self.frames_per_chunk, self.staging_frames
        self.staging[streams, frame_index % R] = frames
        # the chunks whose last frame this is; the first write also those of zero frames only
        first_chunk = np.where(frame_index == self.first_frame, 0, frame_index // K)
        last_chunk = (frame_index + 1) // K
        for e, chunks in zip(streams.tolist(), zip(first_chunk.tolist(), last_chunk.tolist())):
            for chunk in range(*chunks):
                start = (chunk * K) % R  # R is a multiple of K: the chunk's frames are contiguous
                zeros = (chunk + 1) * K <= self.first_frame  # never written: staging may hold newer frames there
                self._append(e, chunk, np.zeros_like(self.staging[e, :K]) if zeros else self.staging[e, start : start + K])

    def _append(self, e: int, chunk: int, frames: np.ndarray) -> None:
        """Compress ``frames`` (K, *frame_shape) as chunk ``chunk`` of stream e and publish it."""
        A = self.arena_nbytes
        data = self.codec.compress(frames)
        offset = int(self.arena_head[e])
        if offset % A + len(data) > A:  # it would wrap: start the next lap
            offset += A - offset % A
        self.arena_head[e] = offset + len(data)  # published first: these bytes may now change
        self.arena[e, offset % A : offset % A + len(data)] = np.frombuffer(data, np.uint8)
        self.chunk_offset[e, chunk % self.table_slots] = offset
        self.chunk_nbytes[e, chunk % self.table_slots] = len(data)

    # ------------------------------------------------------------------ validity
    def oldest_intact_frame(self, streams: np.ndarray, frames_written: np.ndarray, margin_bytes: int = 0) -> np.ndarray:
        """(K,) int64: for each stream, the first frame of the oldest chunk from which on every
        complete chunk's bytes are intact, ``margin_bytes`` before the arena reaches them (the
        first frame of the incomplete chunk if none is). Frames before it cannot be read."""
        K, N, A = self.frames_per_chunk, self.table_slots, self.arena_nbytes
        complete = np.asarray(frames_written, dtype=np.int64) // K  # (K,) chunks in the arena
        base = complete - N  # the table holds chunks [complete − N, complete): slot j holds the one ≡ j mod N
        chunk = base[:, None] + (np.arange(N)[None, :] - base[:, None]) % N  # (K, N)
        gone = (chunk >= 0) & (self.chunk_offset[streams] < self.arena_head[streams][:, None] + margin_bytes - A)
        return np.maximum(np.where(gone, chunk, -1).max(axis=1) + 1, np.maximum(base, 0)) * K  # older: not in the table

    # ------------------------------------------------------------------ reading
    def read(self, streams: np.ndarray, first: np.ndarray, length: int, frames_written: np.ndarray):
        """Frames [first, first + length) of each of ``streams`` (B,), time-major.

        ``frames_written`` (B,): the streams' frame counts read before this call (their windows
        must be written by then); chunks complete by then are decompressed from the arena (each
        (stream, chunk) once), the newer frames copied from staging.
        Returns:
            frames: (length, B, *frame_shape), the stored dtype;
            receipt: what ``intact`` needs to tell whether each window was overwritten meanwhile.
        """
        K, N, A, R = self.frames_per_chunk, self.table_slots, self.arena_nbytes, self.staging_frames
        streams, first = np.asarray(streams, dtype=np.int64), np.asarray(first, dtype=np.int64)
        B, end = len(streams), first + length
        out = np.empty((length, B, *self.frame_shape), dtype=self.dtype)
        arena_from = np.full(B, INTACT, dtype=np.int64)  # lowest arena offset read per window
        staging_from = np.full(B, INTACT, dtype=np.int64)  # first frame read from staging per window
        failed = np.zeros(B, dtype=bool)
        done = np.asarray(frames_written, dtype=np.int64) // K  # chunks complete: in the arena
        # the newest frames, whose chunk is not compressed yet, from staging
        for b in np.flatnonzero(end > done * K).tolist():
            staging_from[b] = max(first[b], done[b] * K)
            out[staging_from[b] - first[b] :, b] = self.staging[streams[b], np.arange(staging_from[b], end[b]) % R]
        # the others: (window, chunk) pairs, window by window, chunks in order
        low = first // K
        chunk = low[:, None] + np.arange(max(int((np.minimum((end - 1) // K + 1, done) - low).max(initial=0)), 0))
        window, j = np.nonzero(chunk < np.minimum((end - 1) // K + 1, done)[:, None])
        chunk = chunk[window, j]
        if len(chunk) == 0:
            return out, (arena_from, staging_from, failed)
        stream = streams[window]
        offset = self.chunk_offset[stream, chunk % N]
        nbytes = self.chunk_nbytes[stream, chunk % N]
        np.minimum.at(arena_from, window, offset)
        t_lo = np.maximum(first[window], chunk * K) - first[window]  # where each pair's frames go in the window
        t_hi = np.minimum(end[window], chunk * K + K) - first[window]
        s_lo = t_lo + first[window] - chunk * K  # and where they are in the chunk
        # each (stream, chunk) decompressed once, into one reused buffer, then copied to its windows
        unique, once, which = np.unique(stream * (1 << 40) + chunk, return_index=True, return_inverse=True)
        order = np.argsort(which, kind="stable")
        scratch = np.empty((K, *self.frame_shape), dtype=self.dtype)
        decoded = -1
        for p, u in zip(order.tolist(), which[order].tolist()):
            if u != decoded:
                decoded, ok = u, True
                e, at, size = int(stream[p]), int(offset[p]), int(nbytes[p])
                position = at % A
                try:  # bytes overwritten while read may fail: ``intact`` tells
                    if not 0 < size <= A - position:
                        raise ChunkError(f"chunk table entry ({at}, {size}) outside the arena")
                    self.codec.decompress_into(self.arena[e, position : position + size], scratch)
                except ChunkError:
                    ok = False
            b, lo, hi, s = int(window[p]), int(t_lo[p]), int(t_hi[p]), int(s_lo[p])
            if ok:
                out[lo:hi, b] = scratch[s : s + hi - lo]
            else:
                failed[b] = True
        return out, (arena_from, staging_from, failed)

    def intact(self, receipt, streams: np.ndarray, frames_written_after: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """After a ``read``: (B,) bool, the window's bytes could not have been overwritten while it
        was read, given the frame counts read afterwards, ``frames_written_after`` (B,), which
        count a frame being written too; and (B,) bool, the window's bytes did not decompress.
        Reads ``arena_head`` now, so it must be called after every read of the window."""
        arena_from, staging_from, failed = receipt
        arena_ok = arena_from >= self.arena_head[streams] - self.arena_nbytes
        staging_ok = staging_from >= np.asarray(frames_written_after) - self.staging_frames
        return arena_ok & staging_ok, failed

    # ------------------------------------------------------------------ statistics
    def stored_bytes_per_frame(self, frames_written: np.ndarray) -> float:
        """Mean compressed bytes per frame over the chunks the table holds now (for logs)."""
        complete = np.minimum(np.asarray(frames_written) // self.frames_per_chunk, self.table_slots)
        used = np.arange(self.table_slots)[None, :] < complete[:, None]
        # slots of a full table all hold chunks; of a stream with fewer chunks, the first ones
        chunks = int(used.sum())
        return float(self.chunk_nbytes[used].sum() / max(chunks * self.frames_per_chunk, 1))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, frames_written: np.ndarray, frames_kept: int) -> dict[str, np.ndarray]:
        """What a checkpoint needs, copied: the chunk table, the arena's live bytes (those of the
        intact chunks holding one of each stream's newest ``frames_kept`` frames), and the frames
        of each stream's incomplete chunk, compressed. Its size follows the data, not the budget.

        Returns (E = streams): obs_frames_per_chunk K and obs_arena_nbytes A (ints), obs_chunk_offset, obs_chunk_nbytes (E, N) int64, obs_arena_head (E,)
        int64, obs_arena_from (E,) int64 (absolute offset of the first saved byte; the saved bytes
        run to the head), obs_arena_bytes (sum,) uint8, obs_partial_nbytes (E,) int64,
        obs_partial (sum,) uint8.
        """
        K, N, A, R = self.frames_per_chunk, self.table_slots, self.arena_nbytes, self.staging_frames
        written = np.asarray(frames_written, dtype=np.int64)
        E = len(written)
        oldest = np.maximum(self.oldest_intact_frame(np.arange(E), written), np.maximum(written - frames_kept, 0))
        arena_from = np.empty(E, dtype=np.int64)
        live, partial, partial_nbytes = [], [], np.zeros(E, dtype=np.int64)
        for e in range(E):
            head, complete, first_chunk = int(self.arena_head[e]), int(written[e]) // K, int(oldest[e]) // K
            start = int(self.chunk_offset[e, first_chunk % N]) if first_chunk < complete else head
            arena_from[e] = max(start, head - A, 0)
            live.append(self.arena[e, np.arange(arena_from[e], head) % A])
            if written[e] > complete * K:  # the incomplete chunk's frames, only in staging
                s0 = (complete * K) % R
                data = self.codec.compress(self.staging[e, s0 : s0 + int(written[e]) - complete * K])
                partial.append(np.frombuffer(data, np.uint8))
                partial_nbytes[e] = len(data)
        empty = np.zeros(0, dtype=np.uint8)
        return {"obs_frames_per_chunk": K, "obs_arena_nbytes": A,
                "obs_chunk_offset": self.chunk_offset.copy(), "obs_chunk_nbytes": self.chunk_nbytes.copy(),
                "obs_arena_head": self.arena_head.copy(), "obs_arena_from": arena_from,
                "obs_arena_bytes": np.concatenate(live) if live else empty, "obs_partial_nbytes": partial_nbytes,
                "obs_partial": np.concatenate(partial) if partial else empty}

    def load_state_dict(self, state: dict, frames_written: np.ndarray) -> None:
        """Inverse of ``state_dict`` into a store of the same arguments, given the restored frame
        counts (E,); the staging frames outside the incomplete chunks are zeroed.

        Raises:
            ValueError: a missing entry, other shapes, or saved bytes that do not fit this arena.
        """
        K, A, R = self.frames_per_chunk, self.arena_nbytes, self.staging_frames
        names = ("obs_frames_per_chunk", "obs_arena_nbytes", "obs_chunk_offset", "obs_chunk_nbytes", "obs_arena_head", "obs_arena_from", "obs_arena_bytes",
                 "obs_partial_nbytes", "obs_partial")
        missing = [name for name in names if state.get(name) is None]
        if missing:
            raise ValueError(f"replay state has no compressed observations ({', '.join(missing)}): it was "
                             f"saved without --replay-compression, or by an older version")
        head, start = np.asarray(state["obs_arena_head"]), np.asarray(state["obs_arena_from"])
        lengths, partial_nbytes = head - start, np.asarray(state["obs_partial_nbytes"])
        E = len(self.arena_head)
        if (int(state["obs_frames_per_chunk"]) != K or int(state["obs_arena_nbytes"]) != A
                or np.shape(state["obs_chunk_offset"]) != self.chunk_offset.shape or head.shape != (E,)
                or start.shape != (E,) or partial_nbytes.shape != (E,) or np.any(lengths < 0) or np.any(lengths > A)
                or lengths.sum() != len(state["obs_arena_bytes"]) or partial_nbytes.sum() != len(state["obs_partial"])):
            raise ValueError(f"replay's compressed observations do not fit this buffer (chunks of "
                             f"{int(state['obs_frames_per_chunk'])} frames in {int(state['obs_arena_nbytes']):,} bytes "
                             f"per stream; this one's: {K} frames in {A:,} bytes, in {E} streams): other --buffer-size, "
                             f"--compressed-bytes-per-frame or stream count?")
        self.chunk_offset[...] = state["obs_chunk_offset"]
        self.chunk_nbytes[...] = state["obs_chunk_nbytes"]
        self.arena_head[...] = head
        saved, blobs = np.asarray(state["obs_arena_bytes"]), np.asarray(state["obs_partial"])
        at, blob_at = np.concatenate([[0], np.cumsum(lengths)]), np.concatenate([[0], np.cumsum(partial_nbytes)])
        self.staging[...] = 0
        for e in range(E):
            self.arena[e, np.arange(start[e], head[e]) % A] = saved[at[e] : at[e + 1]]
            count = int(frames_written[e]) % K
            if count:
                frames = self.codec.decompress(blobs[blob_at[e] : blob_at[e + 1]], count * self.frame_nbytes)
                s0 = (int(frames_written[e]) - count) % R
                self.staging[e, s0 : s0 + count] = np.frombuffer(frames, self.dtype).reshape(count, *self.frame_shape)
