"""Streaming safetensors I/O for Hugging Face checkpoints (single file or sharded with an index).

Reading opens every file once, validates the headers up front (a truncated or corrupt file fails
before any work, naming the file) and reads tensors one at a time. Writing accumulates tensors
into shards of at most `max_shard_bytes` and writes the index Hugging Face loaders expect.
"""

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F64": torch.float64}


class HFWeights:
    """Lazy view of a Hugging Face directory's safetensors weights."""

    def __init__(self, hf_dir):
        self.dir = Path(hf_dir)
        index = self.dir / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.dir / SINGLE).is_file():
            weight_map = None
        else:
            raise ValueError(f"{self.dir} has neither {SINGLE} nor {INDEX}: only safetensors "
                             "checkpoints are supported (convert .bin files with transformers "
                             "save_pretrained(safe_serialization=True))")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE]
        self._handles = {}
        for name in files:
            path = self.dir / name
            try:
                self._handles[name] = safe_open(str(path), framework="pt")
            except Exception as err:  # safetensors raises its own error types
                raise ValueError(f"cannot read {path}: {err} (truncated or corrupt file?)") from err
        if weight_map is None:
            weight_map = {key: SINGLE for key in self._handles[SINGLE].keys()}
        for key, name in weight_map.items():
            if key not in self._handles[name].keys():
                raise ValueError(f"{INDEX} places {key!r} in {name}, which does not hold it")
        self._where = weight_map

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        code = self._handles[self._where[name]].get_slice(name).get_dtype()
        if code not in _DTYPES:
            raise ValueError(f"tensor {name!r} has unsupported dtype {code}")
        return _DTYPES[code]

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(f"tensor {name!r} is missing from {self.dir}")
        try:
            return self._handles[self._where[name]].get_tensor(name)
        except Exception as err:
            raise ValueError(f"cannot read tensor {name!r} from "
                             f"{self.dir / self._where[name]}: {err}") from err


class ShardedWriter:
    """Write tensors into model-0000k-of-0000n.safetensors shards plus the index."""

    def __init__(self, out_dir, max_shard_bytes: int):
        self.dir = Path(out_dir)
        self.max_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self):
        part = self.dir / f"part-{len(self._shards):05d}.safetensors"
        save_file(self._pending, str(part), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Name the shards, write the index (when more than one shard); returns file names."""
        if self._pending:
            self._flush()
        count = len(self._shards)
        if count == 1:
            os.replace(self.dir / "part-00000.safetensors", self.dir / SINGLE)
            return [SINGLE]
        names, weight_map = [], {}
        for k, keys in enumerate(self._shards):
            final = f"model-{k + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.dir / f"part-{k:05d}.safetensors", self.dir / final)
            names.append(final)
            weight_map.update({key: final for key in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.dir / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
        return names
