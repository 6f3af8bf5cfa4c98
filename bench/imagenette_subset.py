"""Every n-th image of the Imagenette validation tar, as a tar of the same layout (a smaller
test set for CPU runs: every 8th is 491 images, stratified by the tar's class order).

    python bench/imagenette_subset.py --every 8 --out out/imagenette-every8.tar
"""

from __future__ import annotations

import argparse
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from autodfp.data import shared_dir
    from autodfp.io import atomic_writer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--every", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("out/imagenette-every8.tar"))
    args = parser.parse_args()
    source = shared_dir() / "data" / "imagenette" / "imagenette2_val_224px.tar"
    with tarfile.open(source) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
        taken = members[::args.every]
        with atomic_writer(args.out) as fh, tarfile.open(fileobj=fh, mode="w") as out:
            for member in taken:
                out.addfile(member, tar.extractfile(member))
    print(f"wrote {args.out}: {len(taken)} of {len(members)} images")


if __name__ == "__main__":
    main()
