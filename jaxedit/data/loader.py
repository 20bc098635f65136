"""The training-data loader: grain MapDataset pipeline over a validated `ExampleIndex`.

    loader = make_loader("data/images", "data/styles", masks="data/masks", resolution=256,
                         batch_size=8, seed=0, host_index=jax.process_index(),
                         host_count=jax.process_count())
    batch = next(loader)       # {"image": uint8 (B,H,W,3), "mask": float32 (B,H,W) in {0,1},
                               #  "style": uint8 (B,H,W,3) (if the index has styles),
                               #  "edited": uint8 (B,H,W,3) (if it has outputs), "index": int32 (B,)}
    state = loader.get_state() # JSON-serialisable dict; store it in the checkpoint
    loader.set_state(state)    # on a freshly built loader with the same arguments: resumes exactly

Pipeline: range(N) -> per-host shard -> shuffle(seed) -> repeat(num_epochs) -> load -> batch.
- Per-host sharding: the N validated examples are truncated to `host_count * (N // host_count)`
  (the remainder, fewer than host_count examples, is dropped) and host h takes examples
  h, h + host_count, ...: disjoint, equal shards, so every host yields the same number of
  batches (collectives never wait on a host that ran out).
- Shuffling is within the host's shard, reshuffled every epoch (grain's `reseed_each_epoch`).
- Batches are per host (`batch_size` examples), may straddle an epoch boundary and are always
  full (a last partial batch of a finite run is dropped): shapes never change, so jit compiles once.
- `index` is the example's position in the validated index (global over hosts); it selects the
  style image, `index mod n_styles`, the instruction (`loader.index.instructions[index]`) of
  instruction datasets, and names the example in logs.
- In-process, `read_threads` threads load up to `prefetch` batches ahead (grain's defaults, 16
  threads and 500 elements, would hold hundreds of batches in memory).
- worker_count > 0 loads batches in grain worker processes (`mp_prefetch` after batching;
  the batches are the same as with 0 workers, but the saved state's format is not): a resumed
  run must keep the same worker_count, which `set_state` checks. Worker processes need absl
  flags parsed (under pytest: `flags.FLAGS.mark_as_parsed()`).
"""
from __future__ import annotations

import hashlib
import json
import os

import grain
import numpy as np

from jaxedit.data.folders import DataError, ExampleIndex, build_index, load_mask, load_square

STATE_VERSION = 1


class LoadExample:
    """Index -> example dict (picklable, for grain workers). Style arrays are preloaded."""

    def __init__(self, index: ExampleIndex, styles: np.ndarray, resolution: int):
        self.index, self.styles, self.resolution = index, styles, resolution

    def __call__(self, i) -> dict[str, np.ndarray]:
        i = int(i)
        ix = self.index
        out = {"image": load_square(ix.images[i], self.resolution),
               "mask": load_mask(ix.masks[i], self.resolution, ix.sizes[i]),
               "index": np.int32(i)}
        if len(self.styles):  # datasets without style images have no "style"
            out["style"] = self.styles[ix.style_of(i)]
        if ix.outputs:  # supervised / HIVE data: the edited image, resized like the input
            out["edited"] = load_square(ix.outputs[i], self.resolution)
        return out


def _jsonable(x):
    return json.loads(json.dumps(x, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


class Loader:
    """Iterator of dict batches with `get_state`/`set_state` (see the module docstring).

    Attributes: index (ExampleIndex), num_examples (validated, all hosts), shard_size (this
    host's examples per epoch), batch_size, num_batches (None when infinite), skipped
    ((path, reason) of the unreadable files left out).
    """

    def __init__(self, index: ExampleIndex, *, resolution: int, batch_size: int, seed: int,
                 shuffle: bool, num_epochs: int | None, worker_count: int, host_index: int,
                 host_count: int, read_threads: int = 2, prefetch: int = 2):
        if not 0 <= host_index < host_count:
            raise ValueError(f"host_index {host_index} not in [0, host_count={host_count})")
        if batch_size < 1 or resolution < 1:
            raise ValueError(f"batch_size ({batch_size}) and resolution ({resolution}) must be positive")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None (infinite), got {num_epochs}")
        self.index, self.batch_size, self.worker_count = index, batch_size, worker_count
        self.num_examples = len(index)
        self.shard_size = self.num_examples // host_count
        if self.shard_size == 0:
            raise DataError(f"{self.num_examples} examples cannot be split over {host_count} hosts")
        self.num_batches = None if num_epochs is None else self.shard_size * num_epochs // batch_size
        if self.num_batches == 0:
            raise DataError(f"{self.shard_size} examples per host x {num_epochs} epoch(s) is less "
                            f"than one batch of {batch_size}")
        self.skipped = index.skipped
        styles = np.stack([load_square(p, resolution) for p in index.styles]) if index.styles else np.zeros(0)

        ds = grain.MapDataset.range(self.num_examples)[: self.shard_size * host_count]
        ds = ds[host_index::host_count]
        if shuffle:
            ds = ds.shuffle(seed=seed)
        ds = ds.repeat(num_epochs).map(LoadExample(index, styles, resolution))
        ds = ds.batch(batch_size, drop_remainder=True).to_iter_dataset(
            grain.ReadOptions(num_threads=max(1, read_threads), prefetch_buffer_size=max(1, prefetch)))
        if worker_count > 0:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
        self._iter = iter(ds)
        names = [[os.path.basename(p) if p else None for p in paths]     # file names, not folders:
                 for paths in (index.images, index.masks, index.styles)]  # a moved workdir resumes
        if index.outputs:
            names.append([os.path.basename(p) for p in index.outputs])
        self.fingerprint = hashlib.sha256(json.dumps(
            [names, resolution, batch_size, seed, shuffle, num_epochs, host_index, host_count]
        ).encode()).hexdigest()[:16]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iter)

    def get_state(self) -> dict:
        """JSON-serialisable position (plus a fingerprint of the data and arguments)."""
        return {"version": STATE_VERSION, "fingerprint": self.fingerprint,
                "worker_count": self.worker_count, "grain": _jsonable(self._iter.get_state())}

    def set_state(self, state: dict) -> None:
        """Continues from `state` (from `get_state` of a loader built with the same arguments)."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data iterator state version {state.get('version')} != {STATE_VERSION}")
        if state["worker_count"] != self.worker_count:
            raise DataError(f"data iterator state was saved with worker_count={state['worker_count']}, "
                            f"this loader has {self.worker_count}: resume with the same worker_count")
        if state["fingerprint"] != self.fingerprint:
            raise DataError("data iterator state does not match this loader: the files, resolution, "
                            "batch size, seed, shuffle, epochs or host sharding changed since it was saved")
        self._iter.set_state(state["grain"])

    def close(self) -> None:
        """Stops worker processes (if any)."""
        close = getattr(self._iter, "close", None)
        if close:
            close()


def make_loader(images: str | None = None, styles: str | None = None, masks: str | None = None, *,
                resolution: int = 256, batch_size: int = 8, seed: int = 0, shuffle: bool = True,
                num_epochs: int | None = None, worker_count: int = 0, host_index: int = 0,
                host_count: int = 1, max_bad_files: int = 10, read_threads: int = 2, prefetch: int = 2,
                index: ExampleIndex | None = None) -> Loader:
    """Builds the training loader (validating the files unless a prebuilt `index` is given).

    images: folder or list file of inputs; styles: folder of style images; masks: folder of
    masks with the inputs' stems, or None for whole-frame masks. batch_size is per host;
    num_epochs=None repeats forever. read_threads/prefetch: in-process loading threads and
    batches loaded ahead (they do not change the batches). See `folders.build_index` for the validation rules.
    """
    if index is None:
        if images is None or styles is None:
            raise ValueError("make_loader needs `images` and `styles` (or a prebuilt `index`)")
        index = build_index(images, styles, masks, max_bad_files=max_bad_files)
    return Loader(index, resolution=resolution, batch_size=batch_size, seed=seed, shuffle=shuffle,
                  num_epochs=num_epochs, worker_count=worker_count, host_index=host_index,
                  host_count=host_count, read_threads=read_threads, prefetch=prefetch)
