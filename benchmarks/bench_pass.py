"""What EvalGuard's clean pass costs, next to the loops it replaces, measured in one process.

Cases, over one synthetic dataset (3x32x32 images, 10 classes, generated once from a fixed seed, no augmentation)
and the same batch size everywhere:

    minimal   model.eval(); torch.inference_mode(); metric.update(model(x), y) over a sequential DataLoader
    pass      EvalGuard's work at the end of a training epoch (its on_train_epoch_end, timed by a subclass)
    pass25    the same with EvalGuard(limit_batches=0.25)
    val-loop  Lightning's validation loop over the same clean loader (trainer.validate, the loop's run() timed)
    epoch     one training epoch without the callback (trainer.fit(max_epochs=1), the fit loop's run() timed)

With num_workers > 0, pass-pw and pass25-pw repeat pass and pass25 with persistent_workers=True on the training
loader. Within each repeat the cases run one after the other (minimal, pass, pass25, val-loop, epoch, minimal, ...);
the table shows medians over the repeats and the medians of the per-repeat ratios.

The cache section uses a second dataset whose __getitem__ does real CPU work (zlib-compressed 3x192x192 images,
decoded, smoothed and resized to 3x32x32: about 2.4 ms per sample) and times Lightning's validation loop over it,
EvalGuard's pass without the cache, and with cache=True its first pass (which fills the cache) and its second (read
from the cache). Peak memory is measured afterwards, for each model and worker count in a fresh spawned process that
trains one epoch with EvalGuard.

    python benchmarks/bench_pass.py                 # CPU, about 6 minutes on 2 cores
    python benchmarks/bench_pass.py --quick         # smoke run, small sizes
    python benchmarks/bench_pass.py --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import gc
import inspect
import logging
import multiprocessing
import os
import platform
import statistics
import sys
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning
import lightning.pytorch as pl
import numpy as np
import torch
import torchmetrics
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Sampler
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lightning_evalguard import EvalGuard, EvalGuardWarning

NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)
DATA_SEED = 0
LIMIT_FRACTION = 0.25
CASES = ("minimal", "pass", "pass25", "val-loop", "epoch")
PERSISTENT_CASES = ("pass-pw", "pass25-pw")  # workers > 0 only: the training loader has persistent_workers=True
CACHE_CASES = ("val-loop", "pass", "pass25", "first", "cached")
HEAVY_SIZE = 192  # the stored (compressed) images are 3 x HEAVY_SIZE x HEAVY_SIZE uint8, decoded to IMAGE_SHAPE
CACHE_TARGET = 0.5
MIB = 1024 * 1024


# ----------------------------------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--models", nargs="+", choices=("cnn", "mlp"), default=["cnn", "mlp"])
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 2], help="DataLoader num_workers values")
    parser.add_argument("--samples", type=int, default=6000, help="size of the synthetic training set")
    parser.add_argument("--batch-size", type=int, default=256, help="the same batch size for every case")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per model and worker count")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds of every case before the repeats")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the usable CPU cores)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--no-persistent", action="store_true", help="skip the persistent_workers=True rows")
    parser.add_argument("--no-cache", action="store_true", help="skip the cache=True section (decoding dataset)")
    parser.add_argument("--cache-samples", type=int, default=2000, help="size of the decoding dataset")
    parser.add_argument("--cache-repeats", type=int, default=3, help="timed repeats of the cache section")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1024 samples, 2 repeats, no warm-up")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.repeats, args.warmup = 1024, 2, 0
        args.cache_samples, args.cache_repeats = 300, 2
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False on this machine.")
    if min(args.workers) < 0 or min(args.samples, args.batch_size, args.repeats) < 1 or args.warmup < 0:
        parser.error("--workers must be >= 0; --samples, --batch-size and --repeats >= 1; --warmup >= 0.")
    if min(args.cache_samples, args.cache_repeats) < 1:
        parser.error("--cache-samples and --cache-repeats must be >= 1.")
    return args


def quiet() -> None:
    """Silence Lightning's info messages and warnings; EvalGuard's warnings become errors (a misconfigured case)."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("error", category=EvalGuardWarning)
    # The pass cases train on the first batches only (FirstIndices) and mean the pass to read the whole dataset.
    warnings.filterwarnings(
        "ignore", message="The sampler of the training loader is a FirstIndices", category=EvalGuardWarning
    )


# ---------------------------------------------------------------------------------------------- data and models


class SyntheticImages(Dataset):
    """Images and labels held in memory, with a ``transform`` attribute (None here: the data is already clean)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels
        self.transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]


def make_dataset(samples: int) -> SyntheticImages:
    """Gaussian images labelled by a fixed random linear map (so the task is learnable), from ``DATA_SEED``."""
    generator = torch.Generator().manual_seed(DATA_SEED)
    images = torch.randn(samples, *IMAGE_SHAPE, generator=generator)
    projection = torch.randn(images[0].numel(), NUM_CLASSES, generator=generator)
    labels = (images.flatten(1) @ projection).argmax(dim=1)
    return SyntheticImages(images, labels)


class DecodingImages(Dataset):
    """Images stored compressed, decoded and resized in ``__getitem__``: CPU work like JPEG decoding and resizing.

    Each sample is a 3 x 192 x 192 uint8 image compressed with zlib (about 100 KB). ``__getitem__`` decompresses it,
    converts it to float, smooths it with three depthwise 3x3 convolutions, resizes it to 3x32x32 with an
    antialiased bilinear filter and normalises it: deterministic, about 2.4 ms per sample on the 2-core VM of
    ``results-cpu.txt``, the order of decoding a JPEG of that size and resizing it. ``transform`` is None: the work
    is the loading itself.
    """

    def __init__(self, blobs: list[bytes], labels: torch.Tensor) -> None:
        self.blobs, self.labels = blobs, labels
        self.transform: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.kernel = (torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16).expand(3, 1, 3, 3)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = np.frombuffer(zlib.decompress(self.blobs[index]), dtype=np.uint8).reshape(3, HEAVY_SIZE, HEAVY_SIZE)
        image = torch.from_numpy(pixels.copy()).float().div_(255).unsqueeze(0)
        for _ in range(3):
            image = F.conv2d(F.pad(image, (1, 1, 1, 1), mode="reflect"), self.kernel, groups=3)
        image = F.interpolate(image, size=IMAGE_SHAPE[1:], mode="bilinear", antialias=True, align_corners=False)
        image = (image[0] - 0.5) / 0.25
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]


def make_decoding_dataset(samples: int) -> DecodingImages:
    """Smooth random images (bicubic upsampling of 8x8 noise, plus a little pixel noise), compressed once.

    Labelled by a fixed random linear map of the 8x8 seed images, so the task is learnable; from ``DATA_SEED``.
    """
    generator = torch.Generator().manual_seed(DATA_SEED)
    seeds = torch.rand(samples, 3, 8, 8, generator=generator)
    projection = torch.randn(seeds[0].numel(), NUM_CLASSES, generator=generator)
    labels = ((seeds.flatten(1) - 0.5) @ projection).argmax(dim=1)
    blobs: list[bytes] = []
    for start in range(0, samples, 256):
        chunk = F.interpolate(seeds[start : start + 256], size=(HEAVY_SIZE, HEAVY_SIZE), mode="bicubic")
        chunk = chunk + 0.02 * torch.randn(chunk.shape, generator=generator)
        pixels = (chunk.clamp(0, 1) * 255).to(torch.uint8).numpy()
        blobs += [zlib.compress(image.tobytes(), 1) for image in pixels]
    return DecodingImages(blobs, labels)


class FirstIndices(Sampler[int]):
    """Yields the first ``count`` indices: a short training epoch for the pass cases (EvalGuard reads the dataset)."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.count))

    def __len__(self) -> int:
        return self.count


def build_net(kind: str) -> nn.Module:
    channels, height, width = IMAGE_SHAPE
    if kind == "cnn":
        return nn.Sequential(
            nn.Conv2d(channels, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Flatten(),
            nn.Dropout(0.3),
            nn.Linear(32 * (height // 4) * (width // 4), NUM_CLASSES),
        )
    if kind == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * height * width, 512),
            nn.BatchNorm1d(512),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(512, 256),
            nn.BatchNorm1d(256),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(256, NUM_CLASSES),
        )
    raise ValueError(f"model must be 'cnn' or 'mlp' (got {kind!r}).")


def guard_options() -> dict[str, Any]:
    """Turn off EvalGuard's end-of-fit summary printout where this version has one (it runs after the timed hook)."""
    return {"print_summary": False} if "print_summary" in inspect.signature(EvalGuard).parameters else {}


def new_metric() -> MulticlassAccuracy:
    return MulticlassAccuracy(num_classes=NUM_CLASSES)


class Classifier(pl.LightningModule):
    """Logs ``train_acc`` on epoch in training_step; its validation_step updates ``clean_acc`` and logs it on epoch."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.net = build_net(kind)
        self.train_acc = new_metric()
        self.clean_acc = new_metric()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        self.train_acc(logits, labels)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return nn.functional.cross_entropy(logits, labels)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, labels = batch
        self.clean_acc.update(self(images), labels)
        self.log("clean_acc", self.clean_acc, on_step=False, on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def activation_bytes(kind: str, batch_size: int) -> int:
    """One batch of activations: the input and every leaf module's output, eval mode (more than is live at once)."""
    net = build_net(kind).eval()
    sizes: list[int] = []

    def record(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        sizes.append(output.numel() * output.element_size())

    for module in net.modules():
        if not list(module.children()):
            module.register_forward_hook(record)
    images = torch.zeros(batch_size, *IMAGE_SHAPE)
    with torch.inference_mode():
        net(images)
    return images.numel() * images.element_size() + sum(sizes)


# --------------------------------------------------------------------------------------------------- the cases


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_trainer(device: str, **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "accelerator": "gpu" if device == "cuda" else "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": "/tmp/evalguard-bench",
    }
    options.update(kwargs)
    return pl.Trainer(**options)


def clean_loader(dataset: Dataset, batch_size: int, workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


@contextmanager
def timed_method(owner: Any, name: str, seconds: list[float], device: str) -> Iterator[None]:
    """Replace ``owner.name`` (an instance attribute shadowing the bound method) by a timed call, then remove it."""
    method = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        sync(device)
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            sync(device)
            seconds.append(time.perf_counter() - start)

    setattr(owner, name, timed)
    try:
        yield
    finally:
        delattr(owner, name)


class TimedEvalGuard(EvalGuard):
    """EvalGuard whose whole ``on_train_epoch_end`` (the pass, the host sync and the logging) is timed."""

    def __init__(self, *args: Any, device: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.device = device
        self.seconds: list[float] = []

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sync(self.device)
        start = time.perf_counter()
        super().on_train_epoch_end(trainer, pl_module)
        sync(self.device)
        self.seconds.append(time.perf_counter() - start)

    def caches(self) -> list[Any]:
        """The caches of the clean sources (EvalGuard keeps its sources private: the benchmark reads them only here)."""
        return [source.cache for source in self._data.sources or [] if source.cache is not None]


def time_minimal(model: Classifier, loader: DataLoader, metric: MulticlassAccuracy, device: str) -> float:
    """(a) The minimal loop; the model and metric are already on ``device``."""
    metric.reset()
    sync(device)
    start = time.perf_counter()
    model.eval()
    with torch.inference_mode():
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            metric.update(model(images), labels)
        metric.compute().item()
    sync(device)
    return time.perf_counter() - start


def fit_with_guard(
    model: Classifier,
    dataset: Dataset,
    args: argparse.Namespace,
    workers: int,
    *,
    limit: float | None = None,
    cache: bool = False,
    persistent: bool = False,
    train_batches: int = 2,
) -> TimedEvalGuard:
    """Two short epochs (``train_batches`` training batches each) with EvalGuard; its passes read the dataset."""
    train_loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=FirstIndices(min(len(dataset), train_batches * args.batch_size)),  # type: ignore[arg-type]
        num_workers=workers,
        persistent_workers=persistent,
    )
    guard = TimedEvalGuard(
        {"acc": new_metric()}, limit_batches=limit, cache=cache, device=args.device, **guard_options()
    )
    trainer = make_trainer(args.device, max_epochs=2, callbacks=[guard])
    trainer.fit(model, train_dataloaders=train_loader)
    return guard


def time_pass(
    model: Classifier,
    dataset: Dataset,
    args: argparse.Namespace,
    workers: int,
    limit: float | None,
    persistent: bool = False,
) -> float:
    """(b) EvalGuard's pass after the second of two short epochs (two training batches each, so that the training
    loader's workers have finished before the pass starts); the pass reads the whole dataset (or ``limit``)."""
    return fit_with_guard(model, dataset, args, workers, limit=limit, persistent=persistent).seconds[-1]


def time_validation_loop(model: Classifier, loader: DataLoader, device: str) -> float:
    """(c) Lightning's validation loop over the clean loader: ``validate_loop.run()`` (loader set-up, iterator,
    hooks, every batch, epoch-end logging), without the Trainer's own set-up and teardown."""
    trainer = make_trainer(device)
    seconds: list[float] = []
    with timed_method(trainer.validate_loop, "run", seconds, device):
        trainer.validate(model, dataloaders=loader, verbose=False)
    return seconds[-1]


def time_epoch(model: Classifier, dataset: Dataset, args: argparse.Namespace, workers: int) -> float:
    """(d) One training epoch without the callback: ``fit_loop.run()`` with max_epochs=1 over the shuffled data."""
    train_loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=workers)
    trainer = make_trainer(args.device, max_epochs=1)
    seconds: list[float] = []
    with timed_method(trainer.fit_loop, "run", seconds, args.device):
        trainer.fit(model, train_dataloaders=train_loader)
    return seconds[-1]


def run_timings(kind: str, workers: int, dataset: Dataset, args: argparse.Namespace) -> dict[str, list[float]]:
    torch.manual_seed(0)
    model = Classifier(kind)
    metric = new_metric()
    loader = clean_loader(dataset, args.batch_size, workers)

    def one_round() -> dict[str, float]:
        times: dict[str, float] = {}
        for case in CASES:
            gc.collect()
            if case == "minimal":
                model.to(args.device)  # fit and validate move the model back to the CPU at teardown
                metric.to(args.device)
                times[case] = time_minimal(model, loader, metric, args.device)
            elif case == "pass":
                times[case] = time_pass(model, dataset, args, workers, None)
            elif case == "pass25":
                times[case] = time_pass(model, dataset, args, workers, LIMIT_FRACTION)
            elif case == "val-loop":
                times[case] = time_validation_loop(model, loader, args.device)
            else:
                times[case] = time_epoch(model, dataset, args, workers)
        if workers > 0 and not args.no_persistent:
            gc.collect()
            times["pass-pw"] = time_pass(model, dataset, args, workers, None, persistent=True)
            gc.collect()
            times["pass25-pw"] = time_pass(model, dataset, args, workers, LIMIT_FRACTION, persistent=True)
        return times

    for _ in range(args.warmup):
        one_round()
    samples: dict[str, list[float]] = {}
    for repeat in range(args.repeats):
        print(f"  [{kind}, workers={workers}] repeat {repeat + 1}/{args.repeats}", file=sys.stderr, flush=True)
        for case, seconds in one_round().items():
            samples.setdefault(case, []).append(seconds)
    return samples


def run_cache_timings(
    kind: str, workers: int, dataset: DecodingImages, args: argparse.Namespace
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """The cache section over the decoding dataset, cases interleaved within each repeat (no warm-up round: the main
    section ran before it, and one round costs four decoding passes):

    val-loop  Lightning's validation loop over a sequential loader on the dataset
    pass      EvalGuard(cache=False): the pass after the second epoch (reads and decodes everything)
    pass25    the same with limit_batches=0.25 (the subset's cost where loading does real work)
    first     EvalGuard(cache=True): the pass after the first epoch, which reads, decodes and fills the cache
    cached    EvalGuard(cache=True): the pass after the second epoch, read from the full cache (steady state)

    The training epochs read one batch each (not timed).
    """
    torch.manual_seed(0)
    model = Classifier(kind)
    loader = clean_loader(dataset, args.batch_size, workers)
    samples: dict[str, list[float]] = {case: [] for case in CACHE_CASES}
    cache_info: dict[str, Any] = {}
    for repeat in range(args.cache_repeats):
        print(f"  [cache: {kind}, workers={workers}] repeat {repeat + 1}/{args.cache_repeats}", file=sys.stderr)
        gc.collect()
        samples["val-loop"].append(time_validation_loop(model, loader, args.device))
        gc.collect()
        plain = fit_with_guard(model, dataset, args, workers, train_batches=1)
        samples["pass"].append(plain.seconds[-1])
        gc.collect()
        subset = fit_with_guard(model, dataset, args, workers, limit=LIMIT_FRACTION, train_batches=1)
        samples["pass25"].append(subset.seconds[-1])
        gc.collect()
        cached = fit_with_guard(model, dataset, args, workers, cache=True, train_batches=1)
        samples["first"].append(cached.seconds[0])
        samples["cached"].append(cached.seconds[-1])
        caches = cached.caches()
        if not caches or caches[0].num_batches == 0:  # the batches themselves are freed at the end of fit
            raise RuntimeError("EvalGuard(cache=True) did not fill its cache: the cached case would not be one.")
        cache_info = {
            "nbytes": caches[0].nbytes,
            "batches": caches[0].num_batches,
            "where": str(caches[0].device) if caches[0].device is not None else "host memory",
        }
    return samples, cache_info


# ---------------------------------------------------------------------------------------------------- memory


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int | None:
    """VmHWM of this process (its peak RSS since start or since the last reset), or None where it is unavailable."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return peak_rss_bytes() is not None


class PeakRss:
    """The peak RSS of one phase: the kernel's VmHWM after a reset, or else a thread sampling RSS every millisecond."""

    def __init__(self) -> None:
        self.method = "VmHWM reset through /proc/self/clear_refs (exact)"
        self.peak = 0
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        self.peak = rss_bytes()
        if reset_peak_rss():
            return
        self.method = "RSS sampled every 1 ms from /proc/self/statm (can miss spikes shorter than that)"
        self._stop.clear()

        def sample() -> None:
            while not self._stop.wait(0.001):
                self.peak = max(self.peak, rss_bytes())

        self._sampler = threading.Thread(target=sample, daemon=True)
        self._sampler.start()

    def stop(self) -> int:
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self._sampler = None
            self.peak = max(self.peak, rss_bytes())
        else:
            self.peak = peak_rss_bytes() or self.peak
        return self.peak


class MemoryEvalGuard(EvalGuard):
    """EvalGuard that records the process's memory before its pass and the pass's own peak."""

    def __init__(self, *args: Any, device: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.device = device
        self.record: dict[str, Any] = {}

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record = self.record
        record["peak_without"] = peak_rss_bytes()  # since process start: set-up and the training epoch
        record["rss_start"] = rss_bytes()
        if self.device == "cuda":
            sync(self.device)
            record["cuda_peak_without"] = torch.cuda.max_memory_allocated()
            record["cuda_start"] = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        probe = PeakRss()
        probe.start()
        super().on_train_epoch_end(trainer, pl_module)
        record["pass_peak"] = probe.stop()
        record["method"] = probe.method
        if self.device == "cuda":
            sync(self.device)
            record["cuda_pass_peak"] = torch.cuda.max_memory_allocated()


def memory_case(kind: str, workers: int, samples: int, batch_size: int, threads: int, device: str) -> dict[str, Any]:
    """In a fresh (spawned) process: one training epoch with EvalGuard; memory before and during the pass."""
    quiet()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dataset = make_dataset(samples)
    train_loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers)
    guard = MemoryEvalGuard({"acc": new_metric()}, device=device, **guard_options())
    trainer = make_trainer(device, max_epochs=1, callbacks=[guard])
    trainer.fit(Classifier(kind), train_dataloaders=train_loader)
    return guard.record


def _memory_child(connection: Any, *args: Any) -> None:
    try:
        connection.send(("ok", memory_case(*args)))
    except BaseException as exc:
        connection.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        connection.close()


def run_memory(kind: str, workers: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run :func:`memory_case` in a fresh spawned process (not a Pool worker: it may not start DataLoader workers)."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(
        target=_memory_child, args=(sender, kind, workers, args.samples, args.batch_size, args.threads, args.device)
    )
    process.start()
    sender.close()
    try:
        status, value = receiver.recv()
    except EOFError:
        status, value = "error", "the process ended without a result"
    process.join()
    if status != "ok":
        raise RuntimeError(f"memory case {kind}, workers={workers} failed in its subprocess: {value}")
    return dict(value)


# --------------------------------------------------------------------------------------------------- reporting


def environment(args: argparse.Namespace) -> list[str]:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = torch.cuda.get_device_name() if args.device == "cuda" else cpu
    with open("/proc/loadavg") as loadavg:
        load = " ".join(loadavg.read().split()[:3])
    return [
        f"command: {sys.executable} {' '.join(sys.argv)}",
        f"python {platform.python_version()}, torch {torch.__version__}, lightning {lightning.__version__},"
        f" torchmetrics {torchmetrics.__version__}, {platform.platform()}",
        f"device: {args.device} ({device}); usable CPU cores: {len(os.sched_getaffinity(0))};"
        f" torch threads: {torch.get_num_threads()}; load average at start: {load}",
        f"data: {args.samples} synthetic {'x'.join(map(str, IMAGE_SHAPE))} images, {NUM_CLASSES} classes, seed"
        f" {DATA_SEED}, no augmentation; batch size {args.batch_size} in every case; metric MulticlassAccuracy",
        f"repeats: {args.repeats} (after {args.warmup} untimed warm-up round(s)), cases interleaved within each repeat",
    ]


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"


def paired_ratio(samples: dict[str, list[float]], top: str, bottom: str) -> float:
    """The median over repeats of top/bottom within the same repeat (the cases ran next to each other)."""
    return statistics.median(a / b for a, b in zip(samples[top], samples[bottom], strict=True))


def fastest_ratio(samples: dict[str, list[float]], top: str, bottom: str) -> float:
    """min(top)/min(bottom): noise only adds time, so the fastest runs are the least disturbed ones."""
    return min(samples[top]) / min(samples[bottom])


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def timing_report(results: dict[tuple[str, int], dict[str, list[float]]]) -> list[str]:
    lines = ["", "Seconds per case: median [min-max] over the repeats"]
    header = f"{'model':<5} {'workers':>7}  " + "  ".join(f"{case:>21}" for case in CASES)
    lines += [header, "-" * len(header)]
    for (kind, workers), samples in results.items():
        lines.append(f"{kind:<5} {workers:>7}  " + "  ".join(f"{spread(samples[case]):>21}" for case in CASES))

    limit_target = LIMIT_FRACTION + 0.05
    lines += [
        "",
        "Ratios: median over repeats of the ratio within each repeat; in brackets min(case)/min(case), the ratio of",
        "the fastest runs (a cross-check where the load moved during the run)",
        f"{'model':<5} {'workers':>7}  {'pass/minimal':>15}  {'pass/val-loop':>15}  {'pass/epoch':>15}"
        f"  {'pass25/pass':>15} (f={LIMIT_FRACTION})",
    ]
    lines.append("-" * len(lines[-1]))
    checks: list[str] = []
    for (kind, workers), samples in results.items():
        pairs = (("pass", "minimal"), ("pass", "val-loop"), ("pass", "epoch"), ("pass25", "pass"))
        medians = [paired_ratio(samples, top, bottom) for top, bottom in pairs]
        cells = [
            f"{median:.3f} ({fastest_ratio(samples, top, bottom):.3f})"
            for median, (top, bottom) in zip(medians, pairs, strict=True)
        ]
        lines.append(f"{kind:<5} {workers:>7}  " + "  ".join(f"{cell:>15}" for cell in cells))
        minimal, validation, _, limited = medians
        checks.append(
            f"{kind:<5} workers={workers}: pass/minimal <= 1.05 {verdict(minimal <= 1.05)};"
            f" pass/val-loop <= 1.0 {verdict(validation <= 1.0)};"
            f" pass25/pass <= {limit_target:.2f} {verdict(limited <= limit_target)}"
        )
    persistent = {key: samples for key, samples in results.items() if all(case in samples for case in PERSISTENT_CASES)}
    if persistent:
        lines += [
            "",
            "Persistent workers: the same pass cases with persistent_workers=True on the training loader (EvalGuard's",
            "rebuilt loader copies it, so its workers start once per fit, at the first pass, not at every pass; the",
            "timed pass is the second of the fit). pass-pw/pass: against the non-persistent pass of the same repeat.",
            f"{'model':<5} {'workers':>7}  {'pass-pw':>21}  {'pass25-pw':>21}  {'pass-pw/pass':>15}"
            f"  {'pass25-pw/pass-pw':>17} (f={LIMIT_FRACTION})",
        ]
        lines.append("-" * len(lines[-1]))
        for (kind, workers), samples in persistent.items():
            full = paired_ratio(samples, "pass-pw", "pass")
            limited = paired_ratio(samples, "pass25-pw", "pass-pw")
            lines.append(
                f"{kind:<5} {workers:>7}  {spread(samples['pass-pw']):>21}  {spread(samples['pass25-pw']):>21}"
                f"  {full:>15.3f}  {limited:>17.3f}"
            )
            checks.append(
                f"{kind:<5} workers={workers}, persistent_workers=True: pass25-pw/pass-pw <= {limit_target:.2f}"
                f" {verdict(limited <= limit_target)}"
            )
    return [*lines, "", "Targets (on the medians):", *checks]


def cache_report(
    results: dict[tuple[str, int], tuple[dict[str, list[float]], dict[str, Any]]], args: argparse.Namespace
) -> list[str]:
    shape = "x".join(map(str, IMAGE_SHAPE))
    lines = [
        "",
        f"Cache: EvalGuard(cache=True) on a decoding dataset: {args.cache_samples} images stored zlib-compressed"
        f" (3x{HEAVY_SIZE}x{HEAVY_SIZE} uint8),",
        f"decoded, smoothed (3 depthwise 3x3 convolutions) and resized to {shape} in __getitem__; batch size"
        f" {args.batch_size}; {args.cache_repeats} repeats,",
        "cases interleaved. val-loop: Lightning's validation loop over it; pass: EvalGuard(cache=False), second pass"
        f" of the fit; pass25: the same with limit_batches={LIMIT_FRACTION};",
        "first: EvalGuard(cache=True), first pass (decodes and fills the cache); cached: its second pass (from the"
        " full cache).",
        "Seconds: median [min-max] over the repeats",
        f"{'model':<5} {'workers':>7}  " + "  ".join(f"{case:>21}" for case in CACHE_CASES),
    ]
    lines.append("-" * len(lines[-1]))
    for (kind, workers), (samples, _) in results.items():
        lines.append(f"{kind:<5} {workers:>7}  " + "  ".join(f"{spread(samples[case]):>21}" for case in CACHE_CASES))
    pairs = (
        ("cached", "val-loop"),
        ("pass", "val-loop"),
        ("first", "val-loop"),
        ("cached", "pass"),
        ("pass25", "pass"),
    )
    lines += [
        "",
        "Ratios: median over repeats of the ratio within each repeat; in brackets min(case)/min(case)",
        f"{'model':<5} {'workers':>7}  " + "  ".join(f"{f'{top}/{bottom}':>16}" for top, bottom in pairs),
    ]
    lines.append("-" * len(lines[-1]))
    checks: list[str] = []
    for (kind, workers), (samples, _) in results.items():
        cells = [
            f"{paired_ratio(samples, top, bottom):.3f} ({fastest_ratio(samples, top, bottom):.3f})"
            for top, bottom in pairs
        ]
        lines.append(f"{kind:<5} {workers:>7}  " + "  ".join(f"{cell:>16}" for cell in cells))
        ratio = paired_ratio(samples, "cached", "val-loop")
        subset = paired_ratio(samples, "pass25", "pass")
        limit_target = LIMIT_FRACTION + 0.05
        checks.append(
            f"{kind:<5} workers={workers}: cached/val-loop <= {CACHE_TARGET} {verdict(ratio <= CACHE_TARGET)};"
            f" pass25/pass <= {limit_target:.2f} {verdict(subset <= limit_target)}"
        )
    info = next(iter(results.values()))[1]
    decoded = args.cache_samples * (torch.Size(IMAGE_SHAPE).numel() * 4 + 8)
    lines += [
        "",
        f"Cache memory (BatchCache.nbytes): {info['nbytes'] / MIB:.1f} MiB in {info['batches']} batches, in"
        f" {info['where']}"
        f" (the decoded dataset: {args.cache_samples} x ({shape} float32 + int64 label) = {decoded / MIB:.1f} MiB)",
        "",
        "Targets (on the medians):",
        *checks,
    ]
    return lines


def memory_report(memory: dict[tuple[str, int], dict[str, Any]], activations: dict[str, int], device: str) -> list[str]:
    method = next(iter(memory.values()))["method"]
    lines = [
        "",
        "Peak memory (MiB), main process only (DataLoader worker processes not included); each row in a fresh",
        "spawned process that trains one epoch with EvalGuard.",
        f"  pass peak: {method}",
        "  peak w/o pass: the process's VmHWM when the pass starts (set-up and the training epoch)",
        "  peak with pass: max(peak w/o pass, pass peak); rise: pass peak - RSS at pass start",
        "  1 batch act.: the input batch plus every layer's output for one batch (eval mode)",
        f"{'model':<5} {'workers':>7}  {'1 batch act.':>12}  {'peak w/o pass':>13}  {'peak with pass':>14}"
        f"  {'RSS at pass start':>17}  {'pass peak':>9}  {'rise':>6}  target: rise <= 1 batch act.",
    ]
    lines.append("-" * len(lines[-1]))
    for (kind, workers), record in memory.items():
        act = activations[kind]
        rise = record["pass_peak"] - record["rss_start"]
        with_pass = max(record["peak_without"], record["pass_peak"])
        lines.append(
            f"{kind:<5} {workers:>7}  {act / MIB:>12.1f}  {record['peak_without'] / MIB:>13.1f}"
            f"  {with_pass / MIB:>14.1f}  {record['rss_start'] / MIB:>17.1f}  {record['pass_peak'] / MIB:>9.1f}"
            f"  {rise / MIB:>6.1f}  {verdict(rise <= act)}"
        )
    if device == "cuda":
        lines += [
            "",
            "CUDA memory (MiB, torch.cuda.max_memory_allocated; peak stats reset at pass start)",
            f"{'model':<5} {'workers':>7}  {'peak w/o pass':>13}  {'peak with pass':>14}  {'alloc at pass start':>19}"
            f"  {'pass peak':>9}  {'rise':>6}  target: rise <= 1 batch act.",
        ]
        lines.append("-" * len(lines[-1]))
        for (kind, workers), record in memory.items():
            rise = record["cuda_pass_peak"] - record["cuda_start"]
            with_pass = max(record["cuda_peak_without"], record["cuda_pass_peak"])
            lines.append(
                f"{kind:<5} {workers:>7}  {record['cuda_peak_without'] / MIB:>13.1f}  {with_pass / MIB:>14.1f}"
                f"  {record['cuda_start'] / MIB:>19.1f}  {record['cuda_pass_peak'] / MIB:>9.1f}  {rise / MIB:>6.1f}"
                f"  {verdict(rise <= activations[kind])}"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print("\n".join(environment(args)), flush=True)

    dataset = make_dataset(args.samples)
    results: dict[tuple[str, int], dict[str, list[float]]] = {}
    for kind in args.models:
        for workers in args.workers:
            results[kind, workers] = run_timings(kind, workers, dataset, args)
    print("\n".join(timing_report(results)), flush=True)

    if not args.no_cache:
        kind = "cnn" if "cnn" in args.models else args.models[0]
        print(f"  building the decoding dataset ({args.cache_samples} samples)", file=sys.stderr, flush=True)
        decoding = make_decoding_dataset(args.cache_samples)
        cache_results = {(kind, workers): run_cache_timings(kind, workers, decoding, args) for workers in args.workers}
        print("\n".join(cache_report(cache_results, args)), flush=True)
        del decoding

    if not args.no_memory:
        activations = {kind: activation_bytes(kind, args.batch_size) for kind in args.models}
        memory = {}
        for kind in args.models:
            for workers in args.workers:
                print(f"  [{kind}, workers={workers}] memory", file=sys.stderr, flush=True)
                memory[kind, workers] = run_memory(kind, workers, args)
        print("\n".join(memory_report(memory, activations, args.device)), flush=True)

    with open("/proc/loadavg") as loadavg:
        load = " ".join(loadavg.read().split()[:3])
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s; load average at end: {load}", flush=True)


if __name__ == "__main__":
    main()
