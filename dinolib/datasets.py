"""Image datasets that survive unreadable images: class folders (ImageFolderSkipBad) and tarballs (TarImageDataset)."""
import io
import multiprocessing
import os
import sys

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from dinolib.errors import InputError
from dinolib.tar_index import TAR_SUFFIXES, is_tar_path, load_tar_entries, tar_class_indices


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageFolderSkipBad:
    """torchvision ImageFolder that survives unreadable images.

    A file that fails to decode is reported once (naming it), remembered, and
    replaced by the next readable image, so a corrupt JPEG cannot end a long run.
    The set of bad files lives in shared memory, so DataLoader workers share it and
    `num_skipped()` in the main process counts them all.
    """

    def __init__(self, root: str, transform=None):
        check_image_folder(root)
        self.folder = ImageFolder(root, transform=None, is_valid_file=_has_image_extension)
        self.root, self.transform = root, transform
        self.samples, self.targets, self.classes = self.folder.samples, self.folder.targets, self.folder.classes
        self.bad = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index: int):
        for attempt in range(len(self)):
            i = (index + attempt) % len(self)
            if self.bad[i]:
                continue
            try:
                img = self.read_image(i)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                self.bad[i] = True
                print(f"WARNING: skipping unreadable image {self.image_name(i)}: {e}", file=sys.stderr, flush=True)
                continue
            return (self.transform(img) if self.transform else img), int(self.targets[i])
        raise InputError(f"no readable image in {self.root}")

    def read_image(self, i: int) -> Image.Image:
        """Image i decoded to RGB (TarImageDataset reads it from its byte range instead)."""
        with open(self.samples[i][0], "rb") as f:
            return Image.open(f).convert("RGB")

    def image_name(self, i: int) -> str:
        """What a warning calls image i."""
        return self.samples[i][0]

    def num_skipped(self) -> int:
        return int(self.bad.sum())


def _has_image_extension(path: str) -> bool:
    return path.lower().endswith(IMG_EXTENSIONS)


def check_image_folder(root: str) -> None:
    """One-line errors for a folder that is missing, empty, or has no class subfolders with images; a tar
    (is_tar_path) is checked with its entries instead, as TarImageDataset will read it."""
    if is_tar_path(root):
        load_tar_entries(root)
        return
    if not os.path.isdir(root):
        raise InputError(f"data folder {root}: does not exist")
    classes = [d.name for d in os.scandir(root) if d.is_dir()]
    if not classes:
        loose = any(_has_image_extension(f) for f in os.listdir(root))
        tars = sorted(f for f in os.listdir(root) if f.lower().endswith(TAR_SUFFIXES))
        raise InputError(f"data folder {root}: no class subfolders" +
                         (f" (it holds {tars[0]}: give the tar's own path to read it)" if tars else
                          " (images must sit in <root>/<class>/, not in the root)" if loose else " (empty)"))
    for c in classes:
        for _, _, files in os.walk(os.path.join(root, c), followlinks=True):
            if any(_has_image_extension(f) for f in files):
                return
    raise InputError(f"data folder {root}: no images ({', '.join(IMG_EXTENSIONS)}) in its class subfolders")


class TarImageDataset(ImageFolderSkipBad):
    """The images of one uncompressed tar, read from their byte ranges with no extraction, skipping unreadable ones
    (a member that is not an image included) as ImageFolderSkipBad does.

    Every process (every DataLoader worker) opens the tar once, at its first read, and reads with os.pread, which
    moves no shared file position: no file handle crosses a fork or a pickle. `classes` are the tar's class folders
    when the entries' class indices are theirs (tools/infer_entries.py on a tar of class folders), else '0', '1', ...
    """

    def __init__(self, tar_path: str, transform=None):
        self.root, self.transform = tar_path, transform
        self.entries, self.names = load_tar_entries(tar_path)
        self.targets = self.entries[:, 0].astype(np.int64)
        classes, indices = tar_class_indices([n.decode("utf-8", "surrogateescape") for n in self.names])
        folders_match = classes and np.array_equal(np.asarray(indices), self.targets)
        self.classes = classes if folders_match else [str(c) for c in range(int(self.targets.max()) + 1)]
        self.bad = torch.zeros(len(self.entries), dtype=torch.bool).share_memory_()
        self._fd, self._fd_pid = None, None

    def __len__(self):
        return len(self.entries)

    def read_image(self, i: int) -> Image.Image:
        start, end = int(self.entries[i, 2]), int(self.entries[i, 3])
        data = os.pread(self._file(), end - start, start)
        if len(data) != end - start:
            raise OSError(f"{len(data)} of its {end - start} bytes read (the tar is shorter than its entries)")
        try:
            return Image.open(io.BytesIO(data)).convert("RGB")
        except Image.UnidentifiedImageError:
            raise OSError("not an image (no decoder recognises its bytes)") from None

    def image_name(self, i: int) -> str:
        return f"{self.root}:{self.names[i].decode('utf-8', 'surrogateescape')}"

    def _file(self) -> int:
        """This process's descriptor of the tar, opened at its first read (a forked worker closes its parent's)."""
        if self._fd_pid != os.getpid():
            if self._fd is not None:
                os.close(self._fd)
            self._fd, self._fd_pid = os.open(self.root, os.O_RDONLY), os.getpid()
        return self._fd

    def __getstate__(self):
        return {**self.__dict__, "_fd": None, "_fd_pid": None}  # a pickled copy opens its own

    def __del__(self):
        if getattr(self, "_fd_pid", None) == os.getpid():
            os.close(self._fd)


def image_dataset(path: str, transform=None) -> ImageFolderSkipBad:
    """The images of a --data_path: a TarImageDataset for a tar (entries beside it), else an ImageFolderSkipBad."""
    return TarImageDataset(path, transform) if is_tar_path(path) else ImageFolderSkipBad(path, transform)


def worker_start_method(num_workers: int):
    """How DataLoader workers start: 'forkserver' where the platform has it, None (the default) without workers.

    Forking the main process itself can deadlock the new worker when another thread holds a
    lock at that instant (pytorch/pytorch#130610): here the queue threads of the previous
    loader still exiting, or the process group's threads. The fork server is a fresh, single-
    threaded process that imported the script once, so workers still start fast.
    """
    if num_workers == 0 or "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    return "forkserver"
