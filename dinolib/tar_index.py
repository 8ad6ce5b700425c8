"""Uncompressed tarballs of images: their headers, and the entries index that tools/infer_entries.py writes.

One uncompressed tarball of images, indexed by byte offsets (the format of the hierarchical DINO fork): each
image is read straight from its byte range, so a file system that chokes on millions of small files sees one.
Beside D/<name>.tar lie <prefix>_entries.npy, a uint64 (N, 4) array with one row per image in tar order,
[class index (0 when classes are unused), file index, start offset of the member's data, end offset], and
<prefix>_file_indices.npy (the original's may be file_indices.npy): the member name of each file index.
"""
import dataclasses
import os
import pickle
import posixpath

import numpy as np

from dinolib.errors import InputError


# One uncompressed tarball of images, indexed by byte offsets (the format of the hierarchical DINO fork): each
# image is read straight from its byte range, so a file system that chokes on millions of small files sees one.
# Beside D/<name>.tar lie <prefix>_entries.npy, a uint64 (N, 4) array with one row per image in tar order,
# [class index (0 when classes are unused), file index, start offset of the member's data, end offset], and
# <prefix>_file_indices.npy (the original's may be file_indices.npy): the member name of each file index.

TAR_BLOCK = 512  # tar headers and data are laid out in blocks of 512 bytes
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst")
COMPRESSION_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
TAR_FILE_TYPES = (b"0", b"\0", b"7")  # regular and contiguous files: the members that have data to read
TAR_NO_DATA_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories, fifos


def is_tar_path(path: str) -> bool:
    """Whether a --data_path names a tarball (read by TarImageDataset) rather than an ImageFolder."""
    return path.lower().endswith(TAR_SUFFIXES) and not os.path.isdir(path)


def _tar_stem(tar_path: str) -> str:
    """The tar's path without its .tar (or compressed-tar) suffix."""
    suffix = next((s for s in TAR_SUFFIXES if tar_path.lower().endswith(s)), "")
    return tar_path[:len(tar_path) - len(suffix)]


def tar_prefix(tar_path: str) -> str:
    """The prefix of a tar's entries files: D/pretrain_dataset.tar -> pretrain, D/train.tar -> train."""
    return os.path.basename(_tar_stem(tar_path)).removesuffix("_dataset")


def infer_entries_command(tar_path: str) -> str:
    """The command that writes the entries files where TarImageDataset looks for them."""
    return (f"python tools/infer_entries.py --tarball_path {tar_path} --output_root "
            f"{os.path.dirname(tar_path) or '.'} --prefix {tar_prefix(tar_path)}")


def check_uncompressed_tar(tar_path: str) -> None:
    """One-line errors for a tar that does not exist or is compressed (a compressed file has no offsets to read at)."""
    if not os.path.isfile(tar_path):
        raise InputError(f"tar {tar_path}: does not exist")
    with open(tar_path, "rb") as f:
        head = f.read(6)
    for magic, kind in COMPRESSION_MAGIC.items():
        if head.startswith(magic):
            plain = _tar_stem(tar_path) + ".tar"
            if plain == tar_path:  # a compressed file named .tar
                plain = _tar_stem(tar_path) + "_uncompressed.tar"
            raise InputError(f"tar {tar_path}: {kind}-compressed, and images cannot be read at byte offsets of a "
                             f"compressed file; decompress it ({kind} -dc {tar_path} > {plain}) and index the "
                             f"result ({infer_entries_command(plain)})")


def _tar_number(field: bytes) -> int:
    """A number field of a tar header: octal digits, or GNU's base-256 (first byte 0x80) for sizes of 8 GiB on."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    digits = field.replace(b"\0", b" ").strip()
    return int(digits, 8) if digits else 0


def _tar_header(block: bytes):
    """(name, size, type) of a 512-byte tar header; None when it is not one (its checksum does not add up)."""
    try:
        checksum = _tar_number(block[148:156])
        size = _tar_number(block[124:136])
    except ValueError:
        return None
    if checksum != sum(block[:148]) + 8 * ord(" ") + sum(block[156:]):  # summed with the checksum field as spaces
        return None
    name = block[:100].split(b"\0", 1)[0]
    if block[257:263] == b"ustar\0" and block[345]:  # POSIX ustar: a name of up to 255 bytes as prefix/name
        name = block[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "surrogateescape"), size, block[156:157]


def _pax_records(data: bytes) -> dict:
    """The '<length> <key>=<value>\\n' records of a pax extended header."""
    records, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


@dataclasses.dataclass(frozen=True)
class TarMember:
    """A member of a tar as its headers describe it; index: its position among the members, as tarfile lists them."""
    index: int
    name: str
    is_file: bool
    start: int  # offset of the member's data, right after its 512-byte header
    end: int


def iter_tar_members(tar_path: str):
    """The members of an uncompressed tar in order, read from their headers alone (the data is skipped by seeking).

    A GNU long name (a ././@LongLink member) or a pax extended header before a member gives its full name
    (and, for pax, its size); neither is a member itself.
    """
    with open(tar_path, "rb") as f:
        index, long_name, pax = 0, None, {}
        while True:
            offset = f.tell()
            block = f.read(TAR_BLOCK)
            if len(block) < TAR_BLOCK or not block.strip(b"\0"):
                return  # the end-of-archive blocks (or the end of the file)
            header = _tar_header(block)
            if header is None:
                raise InputError(f"tar {tar_path}: no tar header at byte {offset} (not a tar, or a damaged one)")
            name, size, kind = header
            start = offset + TAR_BLOCK
            if kind in (b"L", b"K", b"x", b"g"):  # GNU long name or link target, pax extended or global header
                data = f.read(size)
                try:
                    if kind == b"L":
                        long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                    elif kind == b"x":
                        pax = _pax_records(data)
                except ValueError:
                    raise InputError(f"tar {tar_path}: unreadable extended header at byte {offset}") from None
                f.seek(start + -(-size // TAR_BLOCK) * TAR_BLOCK)
                continue
            name = long_name or pax.get("path", name)
            size = int(pax.get("size", size))
            long_name, pax = None, {}
            yield TarMember(index, name, kind in TAR_FILE_TYPES, start, start + size)
            index += 1
            if kind not in TAR_NO_DATA_TYPES:  # files (and, as tarfile does, members of unknown types) have data
                f.seek(start + -(-size // TAR_BLOCK) * TAR_BLOCK)


def tar_class_indices(names: list) -> tuple:
    """(classes, class index of each name) for the member names of a tar of class folders, as ImageFolder assigns
    them to the folder that was archived: the classes are the sorted first folders below the folders all members
    share (`tar -cf train.tar train/` and `tar -cf train.tar -C train .` give train/'s classes). No classes, and
    index 0, when the members sit in no class folder; a member outside the class folders gets index 0 too."""
    parts = [[p for p in name.split("/") if p not in ("", ".")] for name in names]
    common = parts[0][:-1] if parts else []
    for p in parts:
        n = 0
        while n < len(common) and n < len(p) - 1 and p[n] == common[n]:
            n += 1
        common = common[:n]
    folders = [p[len(common)] if len(p) - len(common) >= 2 else None for p in parts]
    classes = sorted({c for c in folders if c is not None})
    position = {c: i for i, c in enumerate(classes)}
    return classes, [position.get(c, 0) for c in folders]


def tar_entries(tar_path: str, progress=None) -> tuple:
    """(entries, names) of a tar, from its headers: entries uint64 (N, 4) [class index, file index, start, end] of
    each regular file in tar order, names their member names. Directories and other non-files are skipped, and so
    is an empty first member (as the original does). progress, if given, is called with each TarMember."""
    check_uncompressed_tar(tar_path)
    rows, names = [], []
    for member in iter_tar_members(tar_path):
        if progress is not None:
            progress(member)
        if member.is_file and not (member.index == 0 and member.start == member.end):
            rows.append((member.index, member.start, member.end))
            names.append(member.name)
    entries = np.zeros((len(rows), 4), dtype=np.uint64)
    if rows:
        entries[:, 1:] = rows
        entries[:, 0] = tar_class_indices(names)[1]
    return entries, names


def write_tar_entries(output_root: str, prefix: str, entries: np.ndarray, names: list) -> tuple:
    """Write <prefix>_entries.npy and <prefix>_file_indices.npy; return their paths.

    The file indices are a structured array (index uint64, name as UTF-8 bytes), which np.load reads with
    allow_pickle=False: unlike the original's pickled dict, loading it cannot run code.
    """
    encoded = [n.encode("utf-8", "surrogateescape") for n in names]
    file_indices = np.zeros(len(names), dtype=[("index", "<u8"), ("name", f"S{max(map(len, encoded), default=1)}")])
    file_indices["index"], file_indices["name"] = entries[:, 1], encoded
    paths = []
    for kind, array in (("entries", entries), ("file_indices", file_indices)):
        path = os.path.join(output_root, f"{prefix}_{kind}.npy")
        with open(path + ".tmp", "wb") as f:  # renamed when complete: an interrupted run leaves no half file
            np.save(f, array, allow_pickle=False)
        os.replace(path + ".tmp", path)
        paths.append(path)
    return tuple(paths)


class _FileIndicesUnpickler(pickle.Unpickler):
    """Unpickles the original's file_indices.npy, a dict of int to str inside a 0-d object array, and nothing else.

    The only globals it looks up are numpy's array reconstruction (ndarray, dtype, _reconstruct); dicts, ints and
    strs need none. A pickle that names any other callable (os.system, eval, ...) fails before anything runs.
    """
    ALLOWED = {("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed")
        if name == "_reconstruct":
            return np.empty(0).__reduce__()[0]  # numpy 1 and 2 name its module differently
        return getattr(np, name)


def read_file_indices(path: str) -> tuple:
    """(file indices uint64, names as bytes) of a file_indices.npy: ours (a structured array, no pickle) or the
    original's pickled dict, read by a restricted unpickler that admits only a dict of int to str."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is not None and read_header(f)[2].hasobject:
                obj = _FileIndicesUnpickler(f).load()
                mapping = obj.item() if isinstance(obj, np.ndarray) and obj.shape == () else obj
                if not (isinstance(mapping, dict) and all(type(k) is int and type(v) is str
                                                          for k, v in mapping.items())):
                    raise InputError(f"file indices {path}: the pickle holds a {type(mapping).__name__}, "
                                     f"not a dict of int to str")
                return (np.array(list(mapping), dtype=np.uint64),
                        np.array([v.encode("utf-8", "surrogateescape") for v in mapping.values()], dtype=bytes))
            f.seek(0)
            array = np.load(f, allow_pickle=False)
    except pickle.UnpicklingError as e:
        raise InputError(f"file indices {path}: refusing to unpickle it ({e}; only a dict of int to str is "
                         f"read); make new ones with tools/infer_entries.py") from None
    except (ValueError, OSError, EOFError, OverflowError, TypeError) as e:
        raise InputError(f"file indices {path}: unreadable ({e})") from None
    if array.dtype.names != ("index", "name") or array.ndim != 1:
        raise InputError(f"file indices {path}: expected a 1-D array with fields (index, name), got {array.dtype} "
                         f"{array.shape}")
    names = array["name"]
    if names.dtype.kind == "U":
        names = np.char.encode(names, "utf-8")
    return array["index"].astype(np.uint64), names


def _same_member(header_name: str, name: str) -> bool:
    """Whether a member name from the file indices is the one in a header: the same, its file name (what the
    original stores, for its directory entries too), or a long name whose first 100 bytes the header holds (GNU and
    pax keep the rest elsewhere)."""
    truncated = len(header_name.encode("utf-8", "surrogateescape")) >= 99
    return (name in (header_name, posixpath.basename(header_name.rstrip("/")))
            or (truncated and name.startswith(header_name)))


def load_tar_entries(tar_path: str) -> tuple:
    """(entries, names as bytes) of a tar from the entries files beside it, checked against the tar: its offsets
    within the tar, and the first and last images' headers naming them and their sizes. One line per problem."""
    check_uncompressed_tar(tar_path)
    root, prefix = os.path.dirname(tar_path) or ".", tar_prefix(tar_path)
    entries_path = os.path.join(root, f"{prefix}_entries.npy")
    candidates = [os.path.join(root, f"{prefix}_file_indices.npy"), os.path.join(root, "file_indices.npy")]
    indices_path = next((p for p in candidates if os.path.isfile(p)), None)
    if not os.path.isfile(entries_path) or indices_path is None:
        missing = entries_path if not os.path.isfile(entries_path) else " or ".join(candidates)
        raise InputError(f"tar {tar_path}: no {missing} beside it; make them with: {infer_entries_command(tar_path)}")
    try:
        entries = np.load(entries_path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"entries {entries_path}: unreadable ({e})") from None
    if entries.ndim != 2 or entries.shape[1] != 4 or entries.dtype.kind not in "ui" or len(entries) == 0:
        raise InputError(f"entries {entries_path}: expected a uint64 array of shape (N, 4), N >= 1, got "
                         f"{entries.dtype} {entries.shape}")
    entries = entries.astype(np.uint64)
    redo = f"index it again: {infer_entries_command(tar_path)}"
    size, end = os.path.getsize(tar_path), int(entries[:, 3].max())
    if end > size:
        raise InputError(f"entries {entries_path}: offsets run to byte {end}, past the end of {tar_path} "
                         f"({size} bytes): a truncated copy of the tar? Copy it again, or {redo}")
    bad = np.flatnonzero((entries[:, 2] < TAR_BLOCK) | (entries[:, 2] > entries[:, 3]))
    if len(bad):
        raise InputError(f"entries {entries_path}: row {bad[0]} ({entries[bad[0], 2]}, {entries[bad[0], 3]}) is no "
                         f"member's data range; {redo}")
    file_indices, names = read_file_indices(indices_path)
    order = np.argsort(file_indices, kind="stable")
    position = np.searchsorted(file_indices[order], entries[:, 1]).clip(max=max(len(order) - 1, 0))
    found = (file_indices[order][position] == entries[:, 1]) if len(order) else np.zeros(len(entries), bool)
    if not found.all():
        raise InputError(f"file indices {indices_path}: no name for file index {entries[~found][0, 1]} of "
                         f"{entries_path} (files of different tars?); {redo}")
    names = names[order][position]
    with open(tar_path, "rb") as f:
        for row in sorted({0, len(entries) - 1}):
            start, end = int(entries[row, 2]), int(entries[row, 3])
            name = names[row].decode("utf-8", "surrogateescape")
            header = _tar_header(os.pread(f.fileno(), TAR_BLOCK, start - TAR_BLOCK))
            if header is None or header[1] != end - start or not _same_member(header[0], name):
                there = "no tar header" if header is None else f"{header[0]!r} of {header[1]} bytes"
                raise InputError(f"entries {entries_path} are not those of {tar_path}: they expect {name!r} of "
                                 f"{end - start} bytes at byte {start}, the tar has {there} there; {redo}")
    return entries, names
