"""Read tensors by name from a Hugging Face model directory, in whichever file layout it uses.

Supported, in order of preference:
  model.safetensors.index.json + shards    (large models)
  *.safetensors                            (one or more files without an index)
  pytorch_model.bin.index.json + shards    (older exports)
  pytorch_model.bin                        (loaded with torch.load(weights_only=True))
safetensors are read lazily, so each pipeline stage only touches the tensors it needs.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from aligner.models.hf.errors import HFFormatError


class HFWeights:
    """name -> tensor access over every weight file of one directory."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._where: dict[str, str] = {}  # tensor name -> file name
        self._open: dict[str, object] = {}  # file name -> safe_open handle or loaded state dict
        index = self.directory / "model.safetensors.index.json"
        singles = sorted(p.name for p in self.directory.glob("*.safetensors"))
        bin_index = self.directory / "pytorch_model.bin.index.json"
        if index.is_file():
            self._where = self._read_index(index)
        elif singles:
            from safetensors import safe_open

            for name in singles:
                with safe_open(str(self.directory / name), framework="pt") as f:
                    self._where.update({key: name for key in f.keys()})
        elif bin_index.is_file():
            self._where = self._read_index(bin_index)
        elif (self.directory / "pytorch_model.bin").is_file():
            state = self._load_bin("pytorch_model.bin")
            self._where = {key: "pytorch_model.bin" for key in state}
        else:
            found = sorted(p.name for p in self.directory.iterdir())[:12]
            raise HFFormatError(f"{self.directory}: no weights found (expected model.safetensors, sharded "
                                f"*.safetensors with model.safetensors.index.json, or pytorch_model.bin); "
                                f"found: {found}")

    def _read_index(self, index: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise HFFormatError(f"{index}: not a weight index (needs a \"weight_map\" object): {exc}") from exc
        missing = sorted({f for f in weight_map.values() if not (self.directory / f).is_file()})
        if missing:
            raise HFFormatError(f"{index}: lists shard file(s) {missing} that are not in {self.directory}")
        return dict(weight_map)

    def _load_bin(self, name: str) -> dict:
        if name not in self._open:
            try:
                self._open[name] = torch.load(self.directory / name, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # pickle errors vary; weights_only refuses arbitrary objects
                raise HFFormatError(f"{self.directory / name}: cannot be read as a plain tensor state dict "
                                    f"(torch.load(weights_only=True)): {exc}") from exc
        return self._open[name]

    def _handle(self, name: str):
        file = self._where[name]
        if file.endswith(".safetensors"):
            if file not in self._open:
                from safetensors import safe_open

                self._open[file] = safe_open(str(self.directory / file), framework="pt")
            return self._open[file]
        return None

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        handle = self._handle(name)
        if handle is not None:
            return tuple(handle.get_slice(name).get_shape())
        return tuple(self._load_bin(self._where[name])[name].shape)

    def get(self, name: str) -> torch.Tensor:
        handle = self._handle(name)
        if handle is not None:
            return handle.get_tensor(name)
        return self._load_bin(self._where[name])[name]
