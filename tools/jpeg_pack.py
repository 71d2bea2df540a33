"""Pack an ImageFolder of small JPEGs into one compact file, and unpack it.

Used to carry the CIFAR-10 JPEG copy to a machine that cannot reach it (a
rented GPU box, say) when the transfer is size-limited: every file of the copy
starts with the same ~600-byte JPEG header, so storing it once shrinks 55 MB of
files to about a third. Unpacking restores byte-identical files.

  python tools/jpeg_pack.py pack ../shared/data/cifar10-jpeg cifar10-jpeg.pack.npz
  python tools/jpeg_pack.py unpack cifar10-jpeg.pack.npz /tmp/cifar10-jpeg
"""

import argparse
import hashlib
import os
from pathlib import Path

import numpy as np


def _header_length(blob: bytes) -> int:
  # Everything before the scan data: up to the end of the start-of-scan segment.
  sos = blob.find(b"\xff\xda")
  return sos + 2 + int.from_bytes(blob[sos + 2:sos + 4], "big")


def pack(root: Path, out: Path) -> None:
  paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg"))
  blobs = [p.read_bytes() for p in paths]
  header = blobs[0][:_header_length(blobs[0])]
  shared = np.array([b.startswith(header) for b in blobs])
  bodies = [b[len(header):] if s else b for b, s in zip(blobs, shared)]
  lengths = np.array([len(b) for b in bodies], np.int64)
  digest = hashlib.sha256(b"".join(blobs)).hexdigest()
  np.savez(out, header=np.frombuffer(header, np.uint8), shared=shared, lengths=lengths,
           bodies=np.frombuffer(b"".join(bodies), np.uint8),
           names=np.array([str(p.relative_to(root)) for p in paths]), sha256=digest)
  print(f"packed {len(paths)} files ({sum(map(len, blobs)) / 1e6:.1f} MB) into {out} "
        f"({out.stat().st_size / 1e6:.1f} MB); {int((~shared).sum())} kept whole")


def unpack(pack_file: Path, root: Path) -> None:
  archive = np.load(pack_file)
  header, bodies = archive["header"].tobytes(), archive["bodies"].tobytes()
  offsets = np.concatenate([[0], np.cumsum(archive["lengths"])])
  hasher = hashlib.sha256()
  for i, (name, shared) in enumerate(zip(archive["names"], archive["shared"])):
    blob = (header if shared else b"") + bodies[offsets[i]:offsets[i + 1]]
    hasher.update(blob)
    path = root / str(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
  if hasher.hexdigest() != str(archive["sha256"]):
    raise SystemExit("unpacked files do not match the packed checksum")
  print(f"unpacked {len(archive['names'])} files into {root}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("command", choices=["pack", "unpack"])
  parser.add_argument("source", type=Path)
  parser.add_argument("target", type=Path)
  args = parser.parse_args()
  (pack if args.command == "pack" else unpack)(args.source, args.target)


if __name__ == "__main__":
  main()
