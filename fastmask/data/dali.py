"""NVIDIA DALI loader: JPEG folder -> normalized image batches on the training device.

    loader = DaliLoader(cfg.data, rank, world_size, seed=cfg.engine.seed, device="cuda:0")
    for imgs in loader.epoch(epoch, start=0):   # imgs [B, 3, S, S] float32, ImageNet-normalized
        ...

Per batch, inside DALI: `fn.readers.file` -> `fn.decoders.image_slice` (the "mixed" nvJPEG decoder
on GPU, decoding only the crop window; libjpeg-turbo on CPU) -> `fn.resize` to S x S (bicubic,
antialiased) -> `fn.crop_mirror_normalize` (flip, (x - mean) / std, HWC -> CHW, output dtype) ->
`DALIGenericIterator`. With `views` (a method's `fastmask.data.ViewSpec`s, e.g. MST's 2 global +
N local crops): `fn.decoders.image` decodes the whole image once, then per view one `fn.resize`
reads its window of the full-resolution image (`roi_start`/`roi_end`) straight to S_v x S_v and one
`fn.crop_mirror_normalize` flips and normalizes it; the batch is a list of V tensors. On CPU the
pipeline runs with `device_id=None`. One pipeline per epoch (its file list is the epoch's order);
the next epoch's is built in a background thread while the last batch of the current one is
consumed, so an epoch boundary does not stall on DALI's reader setup.

What is decided in numpy rather than by DALI's random operators, and why:
- Order and sharding. Each epoch, one permutation of all files drawn from (seed, epoch), cut into
  global batches of B x world_size; rank r takes the r-th block of B of each (the tail that does
  not fill a global batch is left out of this epoch). So every rank runs the same number of steps,
  ranks never share a file, and the union over ranks of step t is the same files whatever the
  world size. The reader gets the rank's list as is (no shuffle, one shard): DALI's own
  `random_shuffle` only mixes through a 1,024-sample buffer, its shards rotate across epochs, and
  it cannot start at a given batch.
- The RandomResizedCrop window and the flip of each sample: torchvision's algorithm (area in
  (min_scale, 1) of the image, aspect in (3/4, 4/3) log-uniform, 10 tries, then a center crop) on
  the image size found when the files were validated, with draws hashed from (seed, epoch, sample
  index) (`augment_params`; view v of a sample draws from (seed, epoch, sample index, v),
  `view_params`): a sample gets the same crop on any rank count or batch size, and the torch loader
  cuts the same view windows. They reach DALI through `fn.external_source`. DALI's random
  operators instead advance a hidden state per batch, so a pipeline restarted at batch k would
  draw different crops.

Reproducibility: given (files, seed, epoch, rank, world_size, batch_size) the file order, crops and
flips are exact (a sample's crop and flip given (files, seed, epoch) alone), and `epoch(e, start=k)`
yields exactly the batches k, k+1, ... of `epoch(e)` (pixels bit-identical on CPU, tested). On GPU
the nvJPEG/hardware decoder gives pixels that differ slightly from the CPU decoder's; repeat runs on
the same GPU and DALI version are expected to match but are not tested here. Changing B x world_size
changes the order.

Corrupt files are found before the first batch by `fastmask.data.files.image_files` (skip with a
warning naming them, or fail, per `data.on_corrupt`). Should DALI still fail on a batch (a file
changed after the check), the files of that batch are checked again: the bad ones are named and,
under `skip`, replaced by another sample of the same batch and the pipeline restarted there (so the
epoch completes with full batches, in step with the other ranks); under `fail` the error names them.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from fastmask.data import ViewSpec, check_views
from fastmask.data.files import check_loader_args, image_files

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INSTALL_HINT = "pip install fastmask[dali]  (installs nvidia-dali-cuda130)"


def require_dali():
    """-> the nvidia.dali module, or ImportError with the install hint."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.plugin.pytorch  # noqa: F401 - the iterator we feed torch with
    except ImportError as e:
        raise ImportError(f"data.loader=dali needs NVIDIA DALI, which is not importable here ({e}). "
                          f"Install it with: {INSTALL_HINT}; or set data.loader=torch.") from e
    return dali


def rrc_windows(sizes: np.ndarray, rng: np.random.Generator, scale: tuple[float, float] = (0.2, 1.0),
                ratio: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10) -> np.ndarray:
    """sizes int [N, 2] (width, height) -> int32 [N, 4] crop windows (x0, y0, w, h), inside the image.

    torchvision's RandomResizedCrop.get_params, vectorized over samples: up to `attempts` draws of
    area fraction ~ U(scale) and aspect ~ exp(U(log ratio)); the first that fits wins; none fits ->
    the largest center crop with aspect clamped to `ratio`.
    """
    return rrc_from_uniforms(sizes, rng.random((len(sizes), 2 * attempts + 2)), scale, ratio)


def rrc_from_uniforms(sizes: np.ndarray, u: np.ndarray, scale: tuple[float, float] = (0.2, 1.0),
                      ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """`rrc_windows` with its randomness given: u float [N, 2 * attempts + 2] in [0, 1).

    Columns: attempts area draws, attempts log-aspect draws, then x and y of the window.
    """
    n = len(sizes)
    attempts = (u.shape[1] - 2) // 2
    W = sizes[:, 0:1].astype(np.float64)
    H = sizes[:, 1:2].astype(np.float64)
    target = W * H * (scale[0] + (scale[1] - scale[0]) * u[:, :attempts])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(lo + (hi - lo) * u[:, attempts:2 * attempts])
    w = np.rint(np.sqrt(target * aspect))
    h = np.rint(np.sqrt(target / aspect))
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = fits.argmax(axis=1)
    rows = np.arange(n)
    w, h = w[rows, first], h[rows, first]
    W, H = W[:, 0], H[:, 0]
    x0 = np.floor(u[:, 2 * attempts] * (W - w + 1))
    y0 = np.floor(u[:, 2 * attempts + 1] * (H - h + 1))
    # Fallback: center crop, aspect clamped into `ratio`.
    ok = fits.any(axis=1)
    in_ratio = W / H
    cw = np.where(in_ratio < ratio[0], W, np.where(in_ratio > ratio[1], np.rint(H * ratio[1]), W))
    ch = np.where(in_ratio < ratio[0], np.rint(W / ratio[0]), H)
    w, h = np.where(ok, w, cw), np.where(ok, h, ch)
    x0 = np.where(ok, x0, (W - w) // 2)
    y0 = np.where(ok, y0, (H - h) // 2)
    return np.stack([x0, y0, w, h], axis=1).astype(np.int32)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """uint64 array -> uint64 array: splitmix64's finalizer (a bijective, well-mixing hash)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def keyed_uniforms(seed: int, epoch: int, indices: np.ndarray, k: int, offset: int = 0) -> np.ndarray:
    """-> float64 [len(indices), k] in [0, 1): draw j of sample i is a hash of (seed, epoch, i, offset + j).

    A counter-based generator: what sample i gets does not depend on which rank, batch or worker
    asks, or in what order, and a whole epoch's draws are one vectorized computation. `offset`
    selects further draws of the same samples (another view's).
    """
    with np.errstate(over="ignore"):
        key = _splitmix(np.array([seed & (2**64 - 1)], dtype=np.uint64) + _GOLDEN)
        key = _splitmix(key ^ np.uint64(epoch & (2**64 - 1)))
        key = _splitmix(key ^ np.asarray(indices, dtype=np.uint64)[:, None])
        h = _splitmix(key + _GOLDEN * np.arange(offset + 1, offset + k + 1, dtype=np.uint64)[None, :])
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def augment_params(seed: int, epoch: int, indices: np.ndarray, sizes: np.ndarray, min_scale: float,
                   hflip: bool, attempts: int = 10, *, max_scale: float = 1.0,
                   ratio: tuple[float, float] = (3 / 4, 4 / 3),
                   view: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Crop windows and flips of samples `indices` (into the dataset) in `epoch`.

    sizes int [N, 2]: (width, height) of those samples. -> (int32 [N, 4] (x0, y0, w, h), int32 [N] 0|1).
    Each sample's draws depend only on (seed, epoch, its index, view): any loader, rank count or
    batch size that calls this gives a sample the same crop and flip. View 0 is the single crop.
    """
    k = 2 * attempts + 3
    u = keyed_uniforms(seed, epoch, indices, k, offset=view * k)
    windows = rrc_from_uniforms(sizes, u[:, :-1], scale=(min_scale, max_scale), ratio=ratio)
    flips = (u[:, -1] < 0.5).astype(np.int32) if hflip else np.zeros(len(indices), np.int32)
    return windows, flips


def view_params(seed: int, epoch: int, indices: np.ndarray, sizes: np.ndarray,
                views: Sequence[ViewSpec]) -> tuple[np.ndarray, np.ndarray]:
    """Every view's window and flip for samples `indices` (sizes int [N, 2] (width, height)) in `epoch`.

    -> (int32 [N, V, 4] (x0, y0, w, h) in the full-resolution image, int32 [N, V] 0|1): view v of a
    sample is `augment_params(..., view=v)` with that view's scale, ratio and flip setting.
    """
    out = [augment_params(seed, epoch, indices, sizes, v.scale[0], v.hflip, max_scale=v.scale[1],
                          ratio=tuple(v.ratio), view=i) for i, v in enumerate(views)]
    return np.stack([w for w, _ in out], axis=1), np.stack([f for _, f in out], axis=1)


class DaliLoader:
    """DALI image loader for one rank. See the module docstring.

    data_cfg: fastmask.engine.config.DataConfig (root, img_size, batch_size, min_scale, hflip,
    on_corrupt, dali_threads). device: "cpu" or a CUDA device; batches land there.
    dtype: float32 | float16 come out of DALI; bfloat16 is converted from float32 on the device.
    views: `fastmask.data.ViewSpec`s to cut from every full-resolution image (None: the one crop
    of data_cfg); a batch is then a list of [B, 3, S_v, S_v], one per view.

    Attributes: batches_per_epoch, files (good files, sorted), skipped ([(path, reason)]).
    """

    def __init__(self, data_cfg, rank: int = 0, world_size: int = 1, seed: int = 0,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 views: Sequence[ViewSpec] | None = None):
        require_dali()  # before any work: a missing extra is the first thing to report
        device = torch.device(device)
        problems = check_loader_args(data_cfg, rank, world_size) + check_views(views)
        if data_cfg.dali_threads < 1:
            problems.append(f"data.dali_threads must be >= 1, got {data_cfg.dali_threads}")
        if device.type not in ("cpu", "cuda"):
            problems.append(f"device must be cpu or cuda, got {device}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            problems.append(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        if problems:
            raise ValueError("DaliLoader: " + "; ".join(problems))
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())

        self.cfg = data_cfg
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.device, self.dtype = device, dtype
        self.views = list(views) if views is not None else None
        self.files, self._sizes, self.skipped = image_files(data_cfg, threads=max(data_cfg.dali_threads, 4))
        self._pending = None  # (epoch, Future of (plan, iterator)): the next epoch, built ahead
        G = data_cfg.batch_size * world_size
        self.batches_per_epoch = len(self.files) // G
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(self.files)} usable image(s) do not fill one global batch of "
                             f"{data_cfg.batch_size} x {world_size} rank(s) = {G}")

    def __len__(self) -> int:
        return self.batches_per_epoch

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """-> int64 [batches_per_epoch, B]: this rank's batches of `epoch` as indices into .files."""
        B, W = self.cfg.batch_size, self.world_size
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.files))
        return perm[:self.batches_per_epoch * B * W].reshape(self.batches_per_epoch, W, B)[:, self.rank]

    def epoch_files(self, epoch: int) -> list[str]:
        """-> this rank's files of `epoch` in the order they are yielded."""
        return [self.files[i] for i in self.epoch_indices(epoch).reshape(-1)]

    def epoch_params(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (int32 [n, 4] crop windows (x0, y0, w, h), int32 [n] flips) in the order of epoch_files;
        with views, (int32 [n, V, 4], int32 [n, V])."""
        idx = self.epoch_indices(epoch).reshape(-1)
        if self.views is not None:
            return view_params(self.seed, epoch, idx, self._sizes[idx], self.views)
        return augment_params(self.seed, epoch, idx, self._sizes[idx], self.cfg.min_scale, self.cfg.hflip)

    def _pipeline(self, files: list[str], windows: np.ndarray, flips: np.ndarray):
        from nvidia.dali import pipeline_def

        B = self.cfg.batch_size
        gpu = self.device.type == "cuda"
        pipe = self._views_graph if self.views is not None else self._crop_graph
        # No DALI random operator is used; the seed only fixes anything DALI might draw internally.
        p = pipeline_def(lambda: pipe(files, windows, flips))(
            batch_size=B, num_threads=self.cfg.dali_threads, device_id=self.device.index if gpu else None,
            seed=(self.seed * 1_000_003 + self.rank) % (2**31), prefetch_queue_depth=2)
        p.build()
        return p

    def _normalize(self, imgs, mirror):
        from nvidia.dali import fn, types

        return fn.crop_mirror_normalize(
            imgs, dtype=types.FLOAT16 if self.dtype == torch.float16 else types.FLOAT,
            output_layout="CHW", mirror=mirror,
            mean=[m * 255 for m in IMAGENET_MEAN], std=[s * 255 for s in IMAGENET_STD])

    def _batch_slice(self, files: list[str], iteration: int) -> slice:
        # The pipeline prefetches past the last batch; those reads are never consumed.
        B = self.cfg.batch_size
        nb = len(files) // B
        return slice((iteration % nb) * B, (iteration % nb + 1) * B)

    def _views_graph(self, files: list[str], windows: np.ndarray, flips: np.ndarray):
        """The full image decoded once; per view: its window resized to S_v x S_v, flipped, normalized."""
        from nvidia.dali import fn, types

        gpu = self.device.type == "cuda"

        def params(iteration: int):
            sl = self._batch_slice(files, iteration)
            out = []
            for v in range(len(self.views)):
                w = windows[sl, v].astype(np.float32)
                start = np.ascontiguousarray(w[:, [1, 0]])   # ROI in the tensor's (y, x) order
                end = np.ascontiguousarray(start + w[:, [3, 2]])
                out += [list(start), list(end), list(np.ascontiguousarray(flips[sl, v]))]
            return out

        jpegs, _ = fn.readers.file(files=files, name="reader", random_shuffle=False, shard_id=0, num_shards=1)
        rois = fn.external_source(source=params, num_outputs=3 * len(self.views), batch=True)
        imgs = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                 adjust_orientation=True)
        outs = []
        for v, spec in enumerate(self.views):
            start, end, flip = rois[3 * v:3 * v + 3]
            x = fn.resize(imgs, roi_start=start, roi_end=end, resize_x=spec.size, resize_y=spec.size,
                          interp_type=types.INTERP_CUBIC, antialias=True)
            outs.append(self._normalize(x, flip))
        return tuple(outs)

    def _crop_graph(self, files: list[str], windows: np.ndarray, flips: np.ndarray):
        """The single crop: only the window decoded, resized to S x S, flipped, normalized."""
        from nvidia.dali import fn, types

        S = self.cfg.img_size
        gpu = self.device.type == "cuda"

        def params(iteration: int):
            sl = self._batch_slice(files, iteration)
            return list(windows[sl, :2]), list(windows[sl, 2:]), list(flips[sl])

        jpegs, _ = fn.readers.file(files=files, name="reader", random_shuffle=False, shard_id=0, num_shards=1)
        anchor, shape, flip = fn.external_source(source=params, num_outputs=3, batch=True)
        # int32 anchor/shape are absolute pixels in (x, y) order ("WH").
        imgs = fn.decoders.image_slice(jpegs, anchor, shape, device="mixed" if gpu else "cpu",
                                       output_type=types.RGB, adjust_orientation=True)
        imgs = fn.resize(imgs, resize_x=S, resize_y=S, interp_type=types.INTERP_CUBIC, antialias=True)
        return self._normalize(imgs, flip)

    def sample_keys(self, epoch: int) -> np.ndarray:
        """-> int64 [batches_per_epoch, B]: each sample's global key, epoch * N + its index (N samples)."""
        return epoch * len(self.files) + self.epoch_indices(epoch).astype(np.int64)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor | list[torch.Tensor]]:
        """Yield this rank's batches [B, 3, S, S] (dtype, device) of `epoch`, from batch `start` on
        (with views: lists of [B, 3, S_v, S_v])."""
        if not 0 <= start <= self.batches_per_epoch:
            raise ValueError(f"start must be in [0, {self.batches_per_epoch}], got {start}")
        return self._batches(epoch, start)

    def _plan(self, epoch: int) -> tuple[list[str], np.ndarray, np.ndarray]:
        """-> this rank's (files, windows, flips) of `epoch` (fresh, mutable copies)."""
        return (self.epoch_files(epoch), *self.epoch_params(epoch))

    def _start(self, files: list[str], windows: np.ndarray, flips: np.ndarray, b: int):
        """-> a DALI iterator over batches b, b+1, ... of the plan (files, windows, flips)."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        B = self.cfg.batch_size
        pipe = self._pipeline(files[b * B:], windows[b * B:], flips[b * B:])
        # prepare_first_batch=False: a decode error surfaces in next(), where it is handled.
        return DALIGenericIterator(pipe, self._outputs(), reader_name="reader", auto_reset=False,
                                   last_batch_policy=LastBatchPolicy.DROP, prepare_first_batch=False)

    def _outputs(self) -> list[str]:
        return ["images"] if self.views is None else [f"view{v}" for v in range(len(self.views))]

    def _prebuild(self, epoch: int) -> None:
        """Build epoch `epoch`'s pipeline in a background thread while the current epoch ends: listing
        an epoch's files into DALI and starting its reader takes ~seconds for ImageNet-sized shards."""
        from concurrent.futures import ThreadPoolExecutor

        if self._pending is not None:
            return
        def build():
            plan = self._plan(epoch)
            return plan, self._start(*plan, 0)
        pool = ThreadPoolExecutor(max_workers=1)
        self._pending = (epoch, pool.submit(build))
        pool.shutdown(wait=False)

    def _take_pending(self, epoch: int, start: int):
        """-> (plan, iterator) prebuilt for (epoch, 0) if that is what is asked, else None (dropped)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        key, future = pending
        try:
            result = future.result()
        except Exception:  # noqa: BLE001 - the foreground build below reports any real problem
            return None
        return result if (key, 0) == (epoch, start) else None

    def _batches(self, epoch: int, start: int) -> Iterator[torch.Tensor]:
        bpe = self.batches_per_epoch
        ready = self._take_pending(epoch, start)
        files, windows, flips = ready[0] if ready else self._plan(epoch)
        b = start
        while b < bpe:
            it = ready[1] if ready else self._start(files, windows, flips, b)
            ready = None
            try:
                while b < bpe:
                    if b == bpe - 1:
                        self._prebuild(epoch + 1)  # overlaps the next epoch's start with this last batch
                    try:
                        out = next(it)
                    except RuntimeError as e:
                        self._replace_bad_files(epoch, b, files, windows, flips, e)
                        break  # rebuild the pipeline from batch b with the bad files replaced
                    got = [out[0][name] for name in self._outputs()]
                    got = [t if t.dtype == self.dtype else t.to(self.dtype) for t in got]
                    yield got if self.views is not None else got[0]
                    b += 1
            finally:
                del it  # frees the pipeline's threads and buffers now, not at the next GC

    def _replace_bad_files(self, epoch: int, b: int, files: list[str], windows: np.ndarray,
                           flips: np.ndarray, error: Exception) -> None:
        """DALI failed at batch b: a file changed since it was checked. Find it (PIL, in the batches that
        could be in flight) and, under on_corrupt=skip, put another sample of its batch in its place
        (so the rank still yields full batches, in step with the other ranks); else raise naming it."""
        from concurrent.futures import ThreadPoolExecutor

        from fastmask.data.files import CorruptImageError, _check_one

        B = self.cfg.batch_size
        lo, hi = b * B, min(len(files), (b + 3) * B)  # the failing batch and the prefetched ones
        with ThreadPoolExecutor(max_workers=max(self.cfg.dali_threads, 4)) as pool:
            checks = list(pool.map(_check_one, files[lo:hi]))
        bad = {lo + k: why for k, (_, _, why) in enumerate(checks) if why is not None}
        where = f"epoch {epoch} batch {b} (rank {self.rank})"
        if not bad:
            raise RuntimeError(f"DALI failed at {where}; every file of the batch still decodes with PIL, "
                               f"so the cause is not a bad file: {files[lo:lo + B]}\n{error}") from error
        listing = "\n".join(f"  {files[k]}: {why}" for k, why in bad.items())
        if self.cfg.on_corrupt == "fail":
            raise CorruptImageError(f"image file(s) that decoded before training fail now, at {where} "
                                    f"(data.on_corrupt=fail):\n{listing}") from error
        warnings.warn(f"skipping image file(s) that fail to decode at {where}; another sample of the "
                      f"same batch takes each one's place (data.on_corrupt=skip):\n{listing}", stacklevel=3)
        self.skipped.extend((files[k], why) for k, why in bad.items())
        for k in bad:
            batch = range((k // B) * B, min(len(files), (k // B + 1) * B))
            good = [g for g in batch if g not in bad] or [g for g in range(lo, hi) if g not in bad]
            if not good:
                raise CorruptImageError(f"no decodable file left near {where}:\n{listing}") from error
            files[k], windows[k], flips[k] = files[good[0]], windows[good[0]], flips[good[0]]
