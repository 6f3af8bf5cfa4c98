"""Image sets: CIFAR-10 from ``../shared`` and user data, as uint8 HWC arrays.

Images stay uint8 ``(N, H, W, 3)`` RGB until a model asks for them; :func:`to_tensor` applies
that model's normalisation. The JPEG tars are decoded once and cached as ``.npz`` under
``$AUTODFP_CACHE`` (default ``~/.cache/autodfp``), keyed by the tar's size and mtime.

Named sets (:data:`SPLITS`):

- ``test-lossless``: the first 1,017 official test images, lossless (quote these numbers).
- ``test-jpeg``: all 10,000 test images as JPEG q75, in the official ``test_batch`` order.
- ``train-jpeg``: the 50,000 training images as JPEG q75, ordered by class.
- ``reward``: a class-stratified, seeded subset of ``train-jpeg`` (default 5,000 images) used as
  the search's reward set; it never overlaps the test images.
"""

from __future__ import annotations

import io
import os
import socket
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from autodfp.errors import AutoDFPError

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
SPLITS = ("test-lossless", "test-jpeg", "train-jpeg", "reward")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
_TEST_TAR = "cifar10_test_jpeg_q75.tar"
_TRAIN_TAR = "cifar10_train_jpeg_q75.tar"
_LOSSLESS = "cifar10_test_lossless_first1017.npz"


@dataclass(frozen=True)
class ImageSet:
    """Images ``x`` (uint8, N x H x W x 3, RGB) with integer labels ``y``."""

    name: str
    x: np.ndarray
    y: np.ndarray
    num_classes: int | None = None
    """Classes the labels number (CIFAR-10: 10; an ImageFolder: its folders); a model scored
    on them must have as many outputs. None: the labels are model output indices already (an
    ``.npz``, or folders mapped through a class index)."""

    def __len__(self) -> int:
        return len(self.y)

    def digest(self) -> str:
        """sha256 of the labels and every 64th image: tells two sets of one name apart (another
        crop ratio or class index) without reading every image."""
        import hashlib

        digest = hashlib.sha256(np.ascontiguousarray(self.y).tobytes())
        digest.update(np.ascontiguousarray(self.x[::64]).tobytes())
        return digest.hexdigest()[:16]

    def subset(self, index: np.ndarray, name: str) -> "ImageSet":
        """The images at ``index``; images on disk (a memory map) stay there, read on use."""
        index = np.asarray(index)
        on_disk = isinstance(self.x, (np.memmap, RowsOnDisk))
        x = RowsOnDisk(self.x, index) if on_disk else self.x[index]
        return ImageSet(name, x, self.y[index], self.num_classes)


class RowsOnDisk:
    """Rows ``index`` of a memory-mapped array, read only when sliced: a subset of 50,000
    cached ImageNet images does not copy them into memory. Slicing and integer-array indexing
    give arrays, as numpy would."""

    def __init__(self, base, index: np.ndarray):
        if isinstance(base, RowsOnDisk):
            base, index = base.base, base.index[index]
        self.base, self.index = base, np.asarray(index, dtype=np.int64)

    @property
    def shape(self) -> tuple:
        return (len(self.index), *self.base.shape[1:])

    @property
    def ndim(self) -> int:
        return self.base.ndim

    @property
    def dtype(self):
        return self.base.dtype

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key) -> np.ndarray:
        rows = self.index[key]
        if np.ndim(rows) == 0:
            return np.asarray(self.base[int(rows)])
        order = np.argsort(rows, kind="stable")  # read the file forwards
        out = np.empty((len(rows), *self.base.shape[1:]), dtype=self.base.dtype)
        out[order] = self.base[rows[order]]
        return out

    def __array__(self, dtype=None, copy=None):
        array = self[:]
        return array if dtype is None else array.astype(dtype)


def shared_dir() -> Path:
    """The ``shared`` folder: ``$AUTODFP_SHARED`` or ``../shared`` beside the project root."""
    env = os.environ.get("AUTODFP_SHARED")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared"
    if not path.is_dir():
        raise AutoDFPError(
            f"shared data folder not found at {path} on host {socket.gethostname()}; put the "
            "project's ../shared there or set AUTODFP_SHARED (on every node of a cluster)")
    return path


def cifar10_dir() -> Path:
    return _require(shared_dir() / "data" / "cifar10", "CIFAR-10 data folder")


def cache_dir() -> Path:
    path = Path(os.environ.get("AUTODFP_CACHE", Path.home() / ".cache" / "autodfp"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise AutoDFPError(f"{what} not found: {path} (on host {socket.gethostname()})")
    return path


def load_split(name: str, *, reward_size: int = 5000, seed: int = 0) -> ImageSet:
    """Load one of :data:`SPLITS`."""
    if name == "test-lossless":
        return _lossless_test()
    if name == "test-jpeg":
        return _jpeg_test()
    if name == "train-jpeg":
        return _jpeg_train()
    if name == "reward":
        return reward_split(reward_size, seed)
    raise AutoDFPError(f"unknown data split {name!r}; choose one of {', '.join(SPLITS)}")


def reward_split(size: int = 5000, seed: int = 0) -> ImageSet:
    """A class-stratified random subset of the training images, fixed by ``seed``."""
    return _stratified_train(size, seed, after=0, name=f"reward-{size}-seed{seed}")


def validation_split(size: int, reward_size: int, seed: int = 0) -> ImageSet:
    """Class-stratified training images disjoint from ``reward_split(reward_size, seed)``:
    the next ``size`` images of the same per-class permutations. For choosing among a search's
    best candidates without the reward set's selection bias (and without test images)."""
    return _stratified_train(size, seed, after=reward_size,
                             name=f"validation-{size}-after-reward-{reward_size}-seed{seed}")


def split_user_data(images: ImageSet, reward_size: int, seed: int = 0
                    ) -> tuple[ImageSet, ImageSet]:
    """A seeded random ``reward_size`` images of user data for a search's reward, and the rest
    for its test accuracy: disjoint, each in the data's order."""
    if not 0 < reward_size < len(images):
        raise AutoDFPError(f"{images.name} holds {len(images)} images: the reward set must be "
                           f"1..{len(images) - 1} of them (the rest are the test images), got "
                           f"{reward_size}")
    order = np.random.default_rng(seed).permutation(len(images))
    reward, test = np.sort(order[:reward_size]), np.sort(order[reward_size:])
    return (images.subset(reward, f"{images.name}-reward-{reward_size}-seed{seed}"),
            images.subset(test, f"{images.name}-test-seed{seed}"))


def _stratified_train(size: int, seed: int, *, after: int, name: str) -> ImageSet:
    train = _jpeg_train()
    if not 0 < size <= len(train) - after:
        raise AutoDFPError(f"{name.split('-')[0]} set size must be in 1..{len(train) - after}, "
                           f"got {size}")
    rng = np.random.default_rng(seed)
    classes = np.unique(train.y)
    per_class = [rng.permutation(np.flatnonzero(train.y == c)) for c in classes]

    def counts(n: int) -> list[int]:
        base, extra = divmod(n, len(classes))
        return [base + (i < extra) for i in range(len(classes))]

    skip, take = counts(after), counts(size)
    picks = [idx[s:s + t] for idx, s, t in zip(per_class, skip, take)]
    if sum(map(len, picks)) != size:
        raise AutoDFPError(f"not enough training images per class for {name}")
    index = np.sort(np.concatenate(picks))
    return train.subset(index, name)


def _lossless_test() -> ImageSet:
    with np.load(_require(cifar10_dir() / _LOSSLESS, "lossless test images")) as data:
        return ImageSet("test-lossless", data["x"], data["y_first1017"].astype(np.int64),
                        len(CIFAR10_CLASSES))


def _jpeg_test() -> ImageSet:
    images, labels, numbers = _decoded_tar(_TEST_TAR)
    with np.load(cifar10_dir() / _LOSSLESS) as data:
        official_labels = data["y_all10000"].astype(np.int64)
    # File NNNN of class c is the NNNN-th image of class c in official order: invert that.
    position = {(int(c), int(k)): i for i, (c, k) in enumerate(zip(labels, numbers))}
    seen = np.zeros(len(CIFAR10_CLASSES), dtype=np.int64)
    order = np.empty(len(official_labels), dtype=np.int64)
    for i, c in enumerate(official_labels):
        order[i] = position[(int(c), int(seen[c]))]
        seen[c] += 1
    return ImageSet("test-jpeg", images[order], official_labels, len(CIFAR10_CLASSES))


def _jpeg_train() -> ImageSet:
    images, labels, _ = _decoded_tar(_TRAIN_TAR)
    return ImageSet("train-jpeg", images, labels, len(CIFAR10_CLASSES))


def _decoded_tar(filename: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tar_path = _require(cifar10_dir() / filename, "CIFAR-10 archive")
    stat = tar_path.stat()
    cached = cache_dir() / f"{tar_path.stem}-{stat.st_size}-{int(stat.st_mtime)}.npz"
    if cached.exists():
        try:
            with np.load(cached) as data:
                return data["x"], data["y"], data["k"]
        except (OSError, ValueError, KeyError):
            cached.unlink(missing_ok=True)  # a corrupt cache is rebuilt, not trusted
    x, y, k = _decode_cifar_tar(tar_path)
    _atomic_savez(cached, x=x, y=y, k=k)
    return x, y, k


def _decode_cifar_tar(tar_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode ``<split>/<class>/NNNN.jpg`` members, sorted by (class, NNNN)."""
    from PIL import Image
    from tqdm import tqdm

    entries = []
    try:
        with tarfile.open(tar_path) as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            for member in tqdm(members, desc=f"decoding {tar_path.name}", unit="img",
                               disable=None, leave=False):
                parts = Path(member.name).parts
                label = CIFAR10_CLASSES.index(parts[-2])
                number = int(Path(parts[-1]).stem)
                with Image.open(io.BytesIO(tar.extractfile(member).read())) as img:
                    entries.append((label, number, np.asarray(img.convert("RGB"))))
    except (tarfile.TarError, OSError, ValueError) as exc:
        raise AutoDFPError(f"cannot read {tar_path}: {exc}") from None
    entries.sort(key=lambda e: (e[0], e[1]))
    x = np.stack([e[2] for e in entries])
    y = np.array([e[0] for e in entries], dtype=np.int64)
    k = np.array([e[1] for e in entries], dtype=np.int64)
    return x, y, k


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    from autodfp.io import atomic_writer

    with atomic_writer(path) as fh:
        np.savez(fh, **arrays)


DEFAULT_CROP_RATIO = 0.875
"""Share of the resized image the center crop keeps (the usual 224 of 256)."""
_CACHE_FROM_IMAGES = 256  # smaller trees decode in well under a second: not worth a cache file


def load_user_data(path: str | Path, *, input_size: tuple[int, int, int] | None = None,
                   crop_ratio: float = DEFAULT_CROP_RATIO,
                   class_index: str | Path | dict | None = None,
                   progress: bool = False) -> ImageSet:
    """User images: an ``.npz`` with ``x`` (N,H,W,3 uint8) and ``y``, or an ImageFolder tree
    (a folder, or a ``.tar`` of one) of images of any size.

    A tree has one sub-folder per class, numbered in sorted order, or by ``class_index``
    (folder name -> model output index; a JSON file or a mapping) for a model whose classes
    are a superset of the folders. With ``input_size`` every image is resized (shorter side to
    ``max(H, W) / crop_ratio``, bilinear) and center-cropped to it; with ``crop_ratio`` 1 an
    image already at the input size is taken as it is. A tree of 256 images or more is decoded
    once into a memory-mapped cache (``$AUTODFP_CACHE``) and read in batches from there.
    """
    path = Path(path)
    if not path.exists():
        raise AutoDFPError(f"data path not found: {path}")
    if not 0.0 < crop_ratio <= 1.0:
        raise AutoDFPError(f"crop ratio must be in (0, 1], got {crop_ratio}")
    if path.suffix == ".npz":
        if class_index is not None:
            raise AutoDFPError("class_index maps class folders; an .npz holds labels already")
        return _load_npz(path)
    if path.is_dir() or tarfile.is_tarfile(path):
        return _load_image_tree(path, input_size, crop_ratio, _class_index(class_index),
                                progress)
    raise AutoDFPError(f"data path must be an .npz file, a folder of class folders or a .tar "
                       f"of one: {path}")


def _class_index(source: str | Path | dict | None) -> dict[str, int] | None:
    if source is None or isinstance(source, dict):
        index = source
    else:
        import json

        path = Path(source)
        try:
            index = json.loads(path.read_text())
        except FileNotFoundError:
            raise AutoDFPError(f"class index not found: {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AutoDFPError(f"cannot read class index {path}: {exc}") from None
    if index is not None and not (
            isinstance(index, dict) and index
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                    for v in index.values())):
        raise AutoDFPError(f"class index {source} must map folder names to output indices "
                           "(whole numbers >= 0)")
    return index


@dataclass(frozen=True)
class _Tree:
    """The image files of an ImageFolder tree (a folder or a tar), by class folder."""

    root: Path
    files: list[str]
    """Paths (relative to the folder, or member names of the tar), in label-then-name order."""
    folders: list[str]
    """Each file's class folder."""

    def read(self, indices: range) -> list[bytes]:
        if self.root.is_dir():
            return [(self.root / self.files[i]).read_bytes() for i in indices]
        with tarfile.open(self.root) as tar:
            return [tar.extractfile(self.files[i]).read() for i in indices]

    def fingerprint(self) -> str:
        import hashlib

        stat = self.root.stat()
        digest = hashlib.sha256(f"{self.root.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
                                .encode())
        if self.root.is_dir():
            for name in self.files:
                info = (self.root / name).stat()
                digest.update(f"|{name}|{info.st_size}|{info.st_mtime_ns}".encode())
        return digest.hexdigest()[:16]


def _list_tree(root: Path) -> _Tree:
    if root.is_dir():
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not classes:
            raise AutoDFPError(f"{root} has no class sub-folders")
        pairs = [(cls, f"{cls}/{f.name}") for cls in classes
                 for f in sorted((root / cls).iterdir())
                 if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    else:
        try:
            with tarfile.open(root) as tar:
                names = [m.name for m in tar.getmembers() if m.isfile()]
        except (tarfile.TarError, OSError) as exc:
            raise AutoDFPError(f"cannot read {root}: {exc}") from None
        pairs = sorted((Path(n).parent.name, n) for n in names
                       if Path(n).suffix.lower() in IMAGE_SUFFIXES and len(Path(n).parts) >= 2)
    if not pairs:
        raise AutoDFPError(f"{root} holds no images in class folders "
                           f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    return _Tree(root, [p[1] for p in pairs], [p[0] for p in pairs])


def _load_image_tree(root: Path, input_size, crop_ratio: float,
                     class_index: dict[str, int] | None, progress: bool) -> ImageSet:
    tree = _list_tree(root)
    classes = sorted(set(tree.folders))
    if class_index is None:
        labels = np.array([classes.index(f) for f in tree.folders], dtype=np.int64)
        num_classes = len(classes)
    else:
        missing = [c for c in classes if c not in class_index]
        if missing:
            raise AutoDFPError(f"class index has no entry for folder(s) {', '.join(missing[:5])}"
                               f" of {root}")
        labels = np.array([class_index[f] for f in tree.folders], dtype=np.int64)
        num_classes = None  # labels are model output indices
    x = _decoded_tree(tree, input_size, crop_ratio, progress)
    return ImageSet(root.name.removesuffix(".tar"), x, labels, num_classes)


def _decoded_tree(tree: _Tree, input_size, crop_ratio: float, progress: bool) -> np.ndarray:
    size = "native" if input_size is None else "x".join(map(str, input_size[1:]))
    cached = cache_dir() / f"images-{tree.root.name}-{tree.fingerprint()}-{size}-{crop_ratio}.npy"
    use_cache = len(tree.files) >= _CACHE_FROM_IMAGES
    if use_cache and cached.is_file():
        try:
            x = np.load(cached, mmap_mode="r")
            if len(x) == len(tree.files):
                return x
        except (OSError, ValueError):
            pass
        cached.unlink(missing_ok=True)  # a corrupt cache is rebuilt, not trusted
    if input_size is None:  # every image as it is: they must share one size
        shape = _rgb_from_bytes(tree.read(range(1))[0], tree.files[0]).shape

        def decode(content: bytes, name: str) -> np.ndarray:
            image = _rgb_from_bytes(content, name)
            if image.shape != shape:
                raise AutoDFPError(f"{tree.root}: images differ in size; give the model's "
                                   "input size (they are then resized and center-cropped)")
            return image
    else:
        shape = (*input_size[1:], 3)

        def decode(content: bytes, name: str) -> np.ndarray:
            return _fit(content, input_size, crop_ratio, name)
    if not use_cache:
        every = range(len(tree.files))
        return np.stack([decode(c, tree.files[i]) for i, c in zip(every, tree.read(every))])
    return _decode_to_cache(tree, decode, shape, cached, progress)


def _decode_to_cache(tree: _Tree, decode, shape: tuple, cached: Path,
                     progress: bool) -> np.ndarray:
    """Decode in batches of 256 on a few threads straight into a memory-mapped file, renamed
    into place when whole: the images never sit in memory all at once."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    count = len(tree.files)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(count, *shape))
        batches = [range(s, min(s + 256, count)) for s in range(0, count, 256)]
        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
            for batch in tqdm(batches, desc=f"decoding {tree.root.name}", unit="batch",
                              disable=None if progress else True, leave=False):
                images = pool.map(decode, tree.read(batch), [tree.files[i] for i in batch])
                for i, image in zip(batch, images):
                    out[i] = image
        out.flush()
        del out
        os.replace(tmp, cached)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return np.load(cached, mmap_mode="r")


def _rgb_from_bytes(content: bytes, name: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(content)) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # incl. Unidentified
        raise AutoDFPError(f"cannot read image {name}: {exc}") from None


def _fit(content: bytes, input_size, crop_ratio: float, name: str) -> np.ndarray:
    """Decode one image, resize its shorter side to ``max(H, W) / crop_ratio`` and center
    crop it to H x W (the usual ImageNet evaluation transform)."""
    from PIL import Image

    height, width = input_size[1:]
    try:
        with Image.open(io.BytesIO(content)) as img:
            img = img.convert("RGB")
            if crop_ratio == 1.0 and img.size == (width, height):
                return np.asarray(img)
            short = int(max(height, width) / crop_ratio)
            w, h = img.size
            new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
            img = img.resize(new, Image.BILINEAR)
            left = int(round((new[0] - width) / 2.0))
            top = int(round((new[1] - height) / 2.0))
            return np.asarray(img.crop((left, top, left + width, top + height)))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise AutoDFPError(f"cannot read image {name}: {exc}") from None


def _load_npz(path: Path) -> ImageSet:
    x, y = _npz_arrays(path, ("x", "y"))
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
        raise AutoDFPError(f"{path}: 'x' must be uint8 (N,H,W,3), got {x.dtype} {x.shape}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise AutoDFPError(f"{path}: 'y' must be integer class labels (N,), got {y.dtype} "
                           f"{y.shape}")
    y = y.astype(np.int64)
    if len(x) != len(y):
        raise AutoDFPError(f"{path}: {len(x)} images but {len(y)} labels")
    return ImageSet(path.stem, x, y)


def _npz_arrays(path: Path, names: tuple[str, ...]) -> tuple[np.ndarray, ...]:
    """The named arrays of an ``.npz`` (no pickles), or one clear error."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise AutoDFPError(f"{path} is a single array, not an .npz archive")
            missing = [n for n in names if n not in data.files]
            if missing:
                raise AutoDFPError(f"{path} must hold array(s) {', '.join(map(repr, names))}; "
                                   f"it has {', '.join(map(repr, data.files)) or 'none'}")
            return tuple(np.asarray(data[n]) for n in names)
    except AutoDFPError:
        raise
    except Exception as exc:  # numpy and zipfile raise many types for a damaged file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AutoDFPError(f"cannot read {path}: {first}") from None


def _read_rgb(file: Path) -> np.ndarray:
    """One image file as uint8 HxWx3; a file that is not a readable image is one clear error."""
    return _rgb_from_bytes(file.read_bytes(), str(file))


def to_tensor(x: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 NHWC -> normalised float32 NCHW."""
    x = np.ascontiguousarray(x) if x.flags.writeable else np.array(x)  # a memmap is read-only
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return t.sub_(m).div_(s).contiguous()


def load_unlabeled(path: str | Path, input_size: tuple[int, int, int], *, count: int,
                   seed: int = 0) -> np.ndarray:
    """``count`` images (uint8 NHWC) from user data for calibration; labels are ignored.

    ``path``: an ``.npz`` with ``x`` (N,H,W,3 uint8), an ImageFolder tree, or a flat folder of
    images. A seeded random subset of ``count`` images is taken, in a fixed order. Images must
    already have the model's input size.
    """
    path = Path(path)
    if not path.exists():
        raise AutoDFPError(f"calibration data not found: {path}")
    if path.suffix == ".npz":
        (x,) = _npz_arrays(path, ("x",))
    elif path.is_dir():
        x = _load_unlabeled_folder(path)
    else:
        raise AutoDFPError(f"calibration data must be an .npz file or a folder of images: {path}")
    channels, height, width = input_size
    if x.ndim != 4 or x.dtype != np.uint8 or x.shape[-1] != channels:
        raise AutoDFPError(f"{path}: images must be uint8 (N,H,W,{channels}), "
                           f"got {x.dtype} {x.shape}")
    if x.shape[1:3] != (height, width):
        raise AutoDFPError(f"{path}: images are {x.shape[1]}x{x.shape[2]}, the model takes "
                           f"{height}x{width}")
    if len(x) == 0:
        raise AutoDFPError(f"{path} holds no images")
    if count > len(x):
        raise AutoDFPError(f"{path} holds {len(x)} images; calibration asks for {count}")
    index = np.sort(np.random.default_rng(seed).permutation(len(x))[:count])
    return np.ascontiguousarray(x[index])


def _load_unlabeled_folder(root: Path) -> np.ndarray:
    files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise AutoDFPError(f"{root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    images = [_read_rgb(file) for file in files]
    if len({im.shape for im in images}) != 1:
        raise AutoDFPError(f"{root}: images differ in size; resize them to the model's input "
                           "size first")
    return np.stack(images)
