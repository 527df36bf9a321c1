#!/usr/bin/env python3
"""Convert an image folder (one sub-directory per class, ImageNet style) into
moeprune image shards: <out>/<split>-NNNNN.safetensors, each holding
  images  U8  [n, size, size, 3]   resized (shorter side) and centre-cropped offline
  labels  I64 [n]                  class index (sorted sub-directory names)
and metadata {"format": "moeprune-shards-v1", "num_classes": "...", "classes": "[...]"}.
Readable with the `safetensors` package or this script's own reader.

  python3 launch/make_shards.py --src /data/imagenet/train --out data/imagenet-shards --split train --size 224
  python3 launch/make_shards.py --src /data/imagenet/val   --out data/imagenet-shards --split test  --size 224

Needs numpy and Pillow (pip install pillow) in the interpreter that runs it.
"""
import argparse
import json
import os
import struct
import sys

import numpy as np


def write_safetensors(path, tensors, metadata):
    header, offset, blobs = {"__metadata__": metadata}, 0, []
    dtypes = {np.dtype("uint8"): "U8", np.dtype("int64"): "I64", np.dtype("float32"): "F32"}
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        b = arr.tobytes()
        header[name] = {"dtype": dtypes[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def load(path, size):
    from PIL import Image
    im = Image.open(path).convert("RGB")
    w, h = im.size
    s = size / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help="folder with one sub-folder per class")
    ap.add_argument("--out", required=True)
    ap.add_argument("--split", required=True, choices=["train", "test"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--per-shard", type=int, default=4096)
    args = ap.parse_args()
    classes = sorted(d for d in os.listdir(args.src) if os.path.isdir(os.path.join(args.src, d)))
    if not classes:
        sys.exit(f"make_shards: no class sub-folders in {args.src}")
    files = [(os.path.join(args.src, c, f), i) for i, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(args.src, c)))]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(files))  # classes mixed inside every shard
    os.makedirs(args.out, exist_ok=True)
    meta = {"format": "moeprune-shards-v1", "num_classes": str(len(classes)), "classes": json.dumps(classes)}
    for s, start in enumerate(range(0, len(files), args.per_shard)):
        chunk = [files[i] for i in order[start:start + args.per_shard]]
        images = np.stack([load(p, args.size) for p, _ in chunk])
        labels = np.array([l for _, l in chunk], dtype=np.int64)
        path = os.path.join(args.out, f"{args.split}-{s:05d}.safetensors")
        write_safetensors(path, {"images": images, "labels": labels}, meta)
        print(f"{path}: {len(chunk)} images", flush=True)


if __name__ == "__main__":
    main()
