"""Index an uncompressed tar of images, to train from it without extracting it: <prefix>_entries.npy and
<prefix>_file_indices.npy, written beside the tar by default.

    tar -cf /data/pretrain_dataset.tar -C /path/to/image/folder .
    python tools/infer_entries.py --tarball_path /data/pretrain_dataset.tar --output_root /data --prefix pretrain
    python main_dino.py --data_path /data/pretrain_dataset.tar --output_dir /path/to/saving_dir

Only the headers are read (the data is skipped by seeking), so a tar of a million images is indexed in seconds to
minutes. Entries: uint64 (N, 4), one row per regular file in tar order, [class index, file index, start offset of
its data, end offset]; directories and other non-files are skipped, GNU long names and pax headers are followed.
On a tar of class folders the class index is the class folder's position in sorted order, as ImageFolder assigns
it (index train.tar and val.tar this way for eval_knn.py and eval_linear.py); it is 0 when there are no folders.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import utils  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser("Entries of a tar of images", add_help=False)
    parser.add_argument("-t", "--tarball_path", required=True, type=str, help="The uncompressed .tar to index.")
    parser.add_argument("-o", "--output_root", default=None, type=str,
                        help="Where the .npy files go (default: the tar's folder, where training looks for them).")
    parser.add_argument("-p", "--prefix", default=None, type=str, help="""Prefix of the .npy file names (default:
        the tar's name without .tar and _dataset, what training looks for: pretrain for pretrain_dataset.tar).""")
    return parser


class Progress:
    """A progress line on stderr, redrawn at most once a second: members seen, bytes of the tar passed."""

    def __init__(self, tar_path: str):
        self.total, self.members, self.last = os.path.getsize(tar_path), 0, 0.0

    def __call__(self, member: utils.TarMember) -> None:
        self.members += 1
        now = time.monotonic()
        if now - self.last >= 1.0:
            self.last = now
            self.draw(member.end)

    def draw(self, position: int) -> None:
        gib, percent = 2 ** 30, 100.0 * position / max(self.total, 1)
        print(f"\rreading headers: {self.members:,} members, {position / gib:.2f} of {self.total / gib:.2f} GiB "
              f"({percent:.0f}%)", end="", file=sys.stderr, flush=True)


def main(args):
    tar_path = args.tarball_path
    default_root, default_prefix = os.path.dirname(tar_path) or ".", utils.tar_prefix(tar_path)
    output_root, prefix = args.output_root or default_root, args.prefix or default_prefix
    if "/" in prefix or not prefix:
        raise utils.InputError(f"--prefix {prefix!r}: must be a non-empty file name prefix, without '/'")
    utils.check_uncompressed_tar(tar_path)
    os.makedirs(output_root, exist_ok=True)
    progress = Progress(tar_path)
    start = time.time()
    entries, names = utils.tar_entries(tar_path, progress)
    progress.draw(progress.total)
    print(file=sys.stderr)
    if len(entries) == 0:
        raise utils.InputError(f"--tarball_path {tar_path}: no regular file in it")
    entries_path, indices_path = utils.write_tar_entries(output_root, prefix, entries, names)
    classes = utils.tar_class_indices(names)[0]
    print(f"{len(entries)} files indexed ({len(classes)} class folders) in {time.time() - start:.1f}s: "
          f"{entries_path}, {indices_path}")
    if os.path.abspath(output_root) != os.path.abspath(default_root) or prefix != default_prefix:
        print(f"note: training reads {default_prefix}_entries.npy and {default_prefix}_file_indices.npy beside "
              f"{tar_path}; move or rename these there")


if __name__ == "__main__":
    parser = argparse.ArgumentParser("Entries of a tar of images", parents=[get_args_parser()])
    utils.run_main(main, parser.parse_args())
