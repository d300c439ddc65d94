"""The VTP training input pipeline on grain.

    records --shuffle(seed, per epoch)--> repeat --tag global position--> [process p of P: p::P]
      --decode (threads)--> valid-record batches of B_clip / P (bad records counted, skipped)
      --views--> {clip_images, tokens, ssl_global, ssl_local, ssl_masks, rec_images}
      [--mp_prefetch(num_workers)]

Every random choice is seeded from (seed, global record position) or, for per-step choices
(which pairs form the SSL / reconstruction sub-batches, which crops get masks), from (seed,
position of the step's first record). Nothing depends on worker timing, so restoring grain's
iterator state reproduces an uninterrupted run byte for byte (for the same num_workers and
process count: mp_prefetch assigns records to workers by position).

Only the B_ssl sampled pairs pay for DINOv2 multi-crop and only the B_rec pairs for the
reconstruction crop; when the CLIP view is off, records are still read B_clip at a time (the
sub-batches are drawn from them) but not tokenized.

Checkpointing with orbax (what `vtp_jax.train.runner` does):

    manager.save(step, args=ocp.args.Composite(state=..., data=checkpoint_save_args(it)))
    manager.restore(step, args=ocp.args.Composite(state=..., data=checkpoint_restore_args(it)))

which writes grain's JSON state, one file per process, next to the model. `it.get_state()` /
`it.set_state()` give the same state as a dict for other checkpointers.
"""
from __future__ import annotations

from typing import Collection, Iterator

import grain
import numpy as np

from vtp_jax.data import sources, transforms
from vtp_jax.data.tokenizer import get_tokenizer
from vtp_jax.images import DecodeError, decode_image, normalize

VIEWS = ("clip", "ssl", "rec")
# Per-reason record counters. skipped/*: the record was dropped; converted/*: it was kept after
# a repair. Counted where they happen (possibly in worker processes) and carried in each batch.
COUNTERS = (
    "skipped/bad_record", "skipped/empty_image", "skipped/not_an_image", "skipped/corrupt_image",
    "skipped/too_small", "skipped/too_large", "skipped/empty_caption",
    "converted/mode", "converted/exif_rotated", "converted/caption_not_utf8", "converted/caption_truncated",
)
_COUNTER_INDEX = {name: i for i, name in enumerate(COUNTERS)}
_STREAM_CLIP, _STREAM_SSL, _STREAM_STEP = 0, 1, 2


def _check(c, views: Collection[str], process_count: int):
    errs = []
    unknown = set(views) - set(VIEWS)
    if unknown:
        errs.append(f"views {sorted(unknown)} unknown; expected a subset of {VIEWS}")
    if c.source not in ("procedural", "array_record", "tfds"):
        errs.append(f"data.source={c.source!r}: expected 'procedural', 'array_record' or 'tfds'")
    for name in ("batch_clip", "batch_ssl", "batch_rec"):
        if c[name] < 0 or c[name] % process_count:
            errs.append(f"data.{name}={c[name]} is not a non-negative multiple of the {process_count} processes")
    if c.batch_clip <= 0:
        errs.append(f"data.batch_clip={c.batch_clip} must be positive: it is the number of records per step")
    for name in ("batch_ssl", "batch_rec"):
        if c[name] > c.batch_clip:
            errs.append(f"data.{name}={c[name]} > data.batch_clip={c.batch_clip}: sub-batches are drawn from the CLIP batch")
    if "ssl" in views and c.batch_ssl and c.global_crops_size % c.patch_size:
        errs.append(f"data.global_crops_size={c.global_crops_size} is not a multiple of data.patch_size={c.patch_size}")
    for name in ("clip_scale", "global_crops_scale", "local_crops_scale", "mask_ratio_min_max"):
        lo, hi = c[name]
        if not 0 <= lo <= hi <= 1 or (lo == 0 and name != "mask_ratio_min_max"):
            errs.append(f"data.{name}={tuple(c[name])}: need 0 <= min <= max <= 1 (min > 0 for crop scales)")
    probabilities = {name: c[name] for name in ("flip_probability", "color_jitter_probability", "grayscale_probability",
                                                 "local_blur_probability", "solarize_probability", "mask_probability")}
    probabilities.update({f"global_blur_probability[{i}]": p for i, p in enumerate(c.global_blur_probability)})
    errs += [f"data.{name}={p} is not a probability" for name, p in probabilities.items() if not 0 <= p <= 1]
    if errs:
        raise ValueError("invalid data config:\n  " + "\n  ".join(errs))


def make_source(c):
    """The record source config.data names (see `sources`)."""
    if c.source == "procedural":
        return sources.ProceduralSource(c.procedural_seed, c.procedural_size, c.procedural_records,
                                        max_objects=c.procedural_objects, sizes=c.procedural_sizes)
    if c.source == "array_record":
        return sources.array_record_source(c.paths)
    if c.source == "tfds":
        return sources.TFDSSource(c.tfds_name, c.tfds_split, c.tfds_data_dir or None)
    raise ValueError(f"data.source={c.source!r}: expected 'procedural', 'array_record' or 'tfds'")


def _tag_position(position: int, record: bytes) -> tuple[int, bytes]:
    return position, record


class _Decode:
    """(position, record bytes) -> example dict; a bad record becomes image None plus its reason.
    Runs in grain's read threads (and in worker processes), so it must never raise."""

    def __init__(self, c, tokenize_captions: bool):
        self.c, self.tokenize_captions = c, tokenize_captions

    def __call__(self, item: tuple[int, bytes]) -> dict:
        position, data = item
        counts = np.zeros(len(COUNTERS), np.int64)
        out = {"position": position, "image": None, "tokens": None, "counts": counts}

        def bump(name):
            counts[_COUNTER_INDEX[name]] += 1

        try:
            record = sources.decode_record(data)
        except ValueError:
            bump("skipped/bad_record")
            return out
        try:
            caption = record["caption"].decode("utf-8")
        except UnicodeDecodeError:
            caption = record["caption"].decode("utf-8", errors="replace")
            bump("converted/caption_not_utf8")
        if self.tokenize_captions:
            if not caption.strip():  # identical empty texts would be contradictory CLIP targets
                bump("skipped/empty_caption")
                return out
            tokenizer = get_tokenizer()
            if len(tokenizer.encode(caption)) > self.c.context_length - 2:
                bump("converted/caption_truncated")
            out["tokens"] = tokenizer(caption, self.c.context_length)[0]
        try:
            image, conversions = decode_image(
                record["image"], max_pixels=self.c.max_image_pixels, min_side=self.c.min_image_side,
                draft_side=self.c.decode_draft_side)
        except DecodeError as e:
            bump(f"skipped/{e.reason}")
            return out
        for name in conversions:
            bump("converted/mode" if name == "mode_converted" else f"converted/{name}")
        out["image"] = image
        return out


class _ValidBatches(grain.IterDataset):
    """Groups decoded examples into lists of `batch_size` valid ones, summing the counters of
    every record consumed (valid or not) into the batch. Its state is its parent's: a batch is
    assembled in one `next`, so nothing is buffered between steps."""

    def __init__(self, parent: grain.IterDataset, batch_size: int, max_consecutive_skips: int):
        super().__init__(parent)
        self.batch_size, self.max_consecutive_skips = batch_size, max_consecutive_skips

    def __iter__(self):
        return _ValidBatchesIterator(self._parent.__iter__(), self.batch_size, self.max_consecutive_skips)

    def __str__(self):
        return f"ValidBatches(batch_size={self.batch_size})"


class _ValidBatchesIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, batch_size: int, max_consecutive_skips: int):
        super().__init__(parent)
        self.batch_size, self.max_consecutive_skips = batch_size, max_consecutive_skips

    def __next__(self) -> tuple[list[dict], np.ndarray]:
        batch, counts, streak = [], np.zeros(len(COUNTERS), np.int64), 0
        while len(batch) < self.batch_size:
            example = next(self._parent)  # StopIteration ends the data: the partial batch is dropped
            counts += example["counts"]
            if example["image"] is None:
                streak += 1
                if streak > self.max_consecutive_skips:
                    bad = {n: int(v) for n, v in zip(COUNTERS, counts) if v}
                    raise RuntimeError(f"{streak} records in a row could not be used (counts in this batch: {bad}); "
                                       "the data source looks broken")
            else:
                streak = 0
                batch.append(example)
        return batch, counts

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


class _Views:
    """(valid examples, counters) -> the step's batch of NumPy arrays (the batch contract of
    `vtp_jax.jobs.pretrain.batch_spec`, per process)."""

    def __init__(self, c, seed: int, views: Collection[str], batch_ssl: int, batch_rec: int):
        self.c, self.seed, self.views = c, seed, views
        self.batch_ssl = batch_ssl if "ssl" in views else 0
        self.batch_rec = batch_rec if "rec" in views else 0

    def _rng(self, position: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, position, stream])

    def __call__(self, item: tuple[list[dict], np.ndarray]) -> dict:
        examples, counts = item
        c, out = self.c, {}
        step_rng = self._rng(examples[0]["position"], _STREAM_STEP)
        if "clip" in self.views:
            crops = [transforms.random_resized_crop(ex["image"], self._rng(ex["position"], _STREAM_CLIP),
                                                    c.image_size, c.clip_scale) for ex in examples]
            out["clip_images"] = normalize(np.stack([np.asarray(x) for x in crops]))
            out["tokens"] = np.stack([ex["tokens"] for ex in examples])
        if self.batch_ssl:
            chosen = step_rng.choice(len(examples), self.batch_ssl, replace=False)
            crops = [transforms.multi_crop(examples[i]["image"], self._rng(examples[i]["position"], _STREAM_SSL), c)
                     for i in chosen]
            out["ssl_global"] = normalize(np.stack([np.stack(g) for g, _ in crops]))
            if c.local_crops_number:
                out["ssl_local"] = normalize(np.stack([np.stack(l) for _, l in crops]))
            else:
                out["ssl_local"] = np.zeros((self.batch_ssl, 0, c.local_crops_size, c.local_crops_size, 3), np.float32)
            grid = (c.global_crops_size // c.patch_size,) * 2
            masks = transforms.ibot_masks(step_rng, 2 * self.batch_ssl, grid, c.mask_ratio_min_max, c.mask_probability)
            out["ssl_masks"] = masks.reshape(self.batch_ssl, 2, *grid)  # (image, crop), as the crops
        if self.batch_rec:
            chosen = step_rng.choice(len(examples), self.batch_rec, replace=False)
            out["rec_images"] = normalize(np.stack(
                [np.asarray(transforms.center_crop(examples[i]["image"], c.image_size)) for i in chosen]))
        out["_counts"] = counts
        return out


class TrainIterator(grain.DatasetIterator):
    """The pipeline's iterator: yields the batch dicts and accumulates the per-reason counters
    the batches carry (they are computed in worker processes, whose own memory the trainer cannot
    see). Counters are part of the checkpointed state, so totals survive restarts."""

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self.totals = np.zeros(len(COUNTERS), np.int64)

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self._parent))
        self.totals += batch.pop("_counts")
        return batch

    def counters(self) -> dict[str, int]:
        """Records skipped or repaired so far by this process, per reason (the runner logs them)."""
        return {n: int(v) for n, v in zip(COUNTERS, self.totals)}

    def get_state(self) -> dict:
        return {"pipeline": self._parent.get_state(), "counts": self.counters()}

    def set_state(self, state: dict):
        self._parent.set_state(state["pipeline"])
        self.totals = np.array([state["counts"].get(n, 0) for n in COUNTERS], np.int64)


def checkpoint_save_args(iterator: TrainIterator):
    """orbax args that save the iterator's state (grain's handler: JSON, one file per process)."""
    return grain.checkpoint.CheckpointSave(iterator)


def checkpoint_restore_args(iterator: TrainIterator):
    """orbax args that restore the state into `iterator` in place."""
    return grain.checkpoint.CheckpointRestore(iterator)


def make_dataset(c, *, seed: int, process_index: int, process_count: int, views: Collection[str] = VIEWS,
                 source=None) -> grain.IterDataset:
    """The pipeline as a grain IterDataset (see the module docstring); `source` overrides the
    one config.data names (tests and benchmarks pass their own)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} outside [0, process_count={process_count})")
    _check(c, views, process_count)
    source = make_source(c) if source is None else source
    ds = grain.MapDataset.source(source)
    if c.shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(c.num_epochs or None)
    ds = ds.map_with_index(_tag_position)[process_index::process_count]
    ds = ds.map(_Decode(c, tokenize_captions="clip" in views))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=c.read_threads, prefetch_buffer_size=c.read_buffer_size))
    batch = c.batch_clip // process_count
    it = _ValidBatches(it, batch, max_consecutive_skips=1000 + 10 * batch)
    it = it.map(_Views(c, seed, views, c.batch_ssl // process_count, c.batch_rec // process_count))
    if c.num_workers:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app use defaults
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=c.num_workers,
                                                         per_worker_buffer_size=c.worker_buffer_size))
    return it


def make_train_iterator(config_data, *, seed: int, process_index: int | None = None, process_count: int | None = None,
                        views: Collection[str] = VIEWS, source=None) -> TrainIterator:
    """Per-process iterator of training batches (NumPy, local 1/P of every global batch):

      clip_images (B_clip/P, S, S, 3) f32   tokens (B_clip/P, context_length) int32
      ssl_global (B_ssl/P, 2, G, G, 3) f32  ssl_local (B_ssl/P, n_local, L, L, 3) f32
      ssl_masks (B_ssl/P, 2, G/p, G/p) bool rec_images (B_rec/P, S, S, 3) f32

    ImageNet-normalized; everything batch-major (multi-crop arrays (image, crop, ...)). `views` leaves out what no active
    objective consumes (e.g. ('rec',) for the plain autoencoder); process index / count default
    to JAX's.
    """
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    ds = make_dataset(config_data, seed=seed, process_index=process_index, process_count=process_count,
                      views=views, source=source)
    return TrainIterator(iter(ds))


def make_eval_iterator(source, *, image_size: int, batch_size: int, crop: str = "center", process_index: int = 0,
                       process_count: int = 1, num_threads: int = 8, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """One ordered pass over this process's 1/P of `source` (e.g. `sources.TFDSSource(split=
    'validation')`): {'images' (b, S, S, 3) f32 normalized, 'labels' (b,) int32, 'valid' (b,)
    bool}. crop 'center' is ADM's (rFID, DiT latents), 'squash' VTP's zero-shot resize. The last
    batch is padded (valid False) so every step has the same shape; undecodable records are
    skipped (an evaluation set should have none). `start`: this process's records to skip, never
    read (a resumed pass)."""
    crops = {"center": transforms.center_crop, "squash": transforms.squash_resize}
    if crop not in crops:
        raise ValueError(f"crop={crop!r}: expected one of {sorted(crops)}")

    def load(data: bytes):
        try:
            record = sources.decode_record(data)
            image, _ = decode_image(record["image"])  # PIL's pixel limit: an eval image is no bomb
        except ValueError:  # a bad record or DecodeError
            return None
        return np.asarray(crops[crop](image, image_size)), record["label"]

    ds = grain.MapDataset.source(source)[process_index::process_count][start:].map(load)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads)).filter(lambda x: x is not None)
    images, labels = [], []
    for image, label in ds:
        images.append(image)
        labels.append(label)
        if len(images) == batch_size:
            yield _eval_batch(images, labels, batch_size)
            images, labels = [], []
    if images:
        yield _eval_batch(images, labels, batch_size)


def _eval_batch(images, labels, batch_size):
    n = len(images)
    pad = batch_size - n
    images = np.stack(images + [np.zeros_like(images[0])] * pad)
    return {"images": normalize(images), "labels": np.array(labels + [-1] * pad, np.int32),
            "valid": np.arange(batch_size) < n}
