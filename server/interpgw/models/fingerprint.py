"""A fingerprint of a model's weights: part of every activation-cache key.

Cache entries must never outlive the weights they were computed from: a folder re-converted or fine-tuned in
place keeps its name, so the key cannot rely on the model id alone. Small checkpoints are hashed in full;
large ones by their safetensors headers, sizes and modification times (hashing gigabytes at every start would
be slow), which changes whenever the files are rewritten.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

FULL_HASH_LIMIT = 2 * 2**30


def weights_fingerprint(model_dir: str | Path) -> str:
    folder = Path(model_dir)
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) if folder.is_dir() else []
    if not files:
        return f"unhashed:{model_dir}"  # a hub id vLLM resolved itself: the id is all we know
    digest = hashlib.sha256()
    full = sum(f.stat().st_size for f in files) <= FULL_HASH_LIMIT
    for file in files:
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}".encode())
        with open(file, "rb") as handle:
            if full:
                while block := handle.read(8 * 2**20):
                    digest.update(block)
            else:
                digest.update(handle.read(8 * 2**20))  # the header (tensor names, dtypes, offsets) and more
                digest.update(str(stat.st_mtime_ns).encode())
    return ("sha256:" if full else "header:") + digest.hexdigest()[:32]
