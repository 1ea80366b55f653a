"""Tensor sources: a Hugging Face safetensors directory, or deterministic random weights.

Both answer ``get(name, shape)`` one tensor at a time, so a role reads only the tensors it owns
and never materialises the full state dict. Names are the hub names
(``model.layers.3.mlp.experts.7.up_proj.weight``).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch

from afsplit.errors import CheckpointError


class CheckpointReader:
    """Streams tensors out of ``*.safetensors`` files (single file or sharded with an index)."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self._files: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: corrupt index ({e}); re-download the checkpoint") from None
            self._files = {name: self.dir / f for name, f in weight_map.items()}
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.dir}: no *.safetensors files; model.path must hold the checkpoint's weights")
            for f in files:
                for name in self._open(f).keys():
                    self._files[name] = f

    def _open(self, path: Path):
        if path not in self._handles:
            from safetensors import safe_open

            if not path.exists():
                raise CheckpointError(f"{path}: listed in the index but missing; re-download the checkpoint")
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"{path}: not a valid safetensors file ({e}); re-download the checkpoint") from None
        return self._handles[path]

    def has(self, name: str) -> bool:
        return name in self._files

    def get(self, name: str, shape: tuple[int, ...], device=None) -> torch.Tensor:
        """The tensor `name` (on the CPU; `device` is a hint that file readers ignore)."""
        if name not in self._files:
            raise CheckpointError(f"{self.dir}: tensor {name} is missing; the checkpoint does not match config.json")
        path = self._files[name]
        try:
            tensor = self._open(path).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor {name} ({e}); re-download the checkpoint") from None
        if tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(
                f"{path}: tensor {name} has shape {list(tensor.shape)} but config.json implies {list(shape)}")
        return tensor


class RandomWeights:
    """Deterministic random tensors: the same (seed, name) always gives the same values.

    Each tensor is seeded from its own name, so an expert rank that generates only its experts
    gets exactly the values a single-process engine generates for them.
    """

    def __init__(self, seed: int = 0, std: float = 0.02):
        self.seed = seed
        self.std = std

    def has(self, name: str) -> bool:
        return True

    def get(self, name: str, shape: tuple[int, ...], device=None) -> torch.Tensor:
        """Generated directly on `device` (real-shaped presets have tens of GB of experts).

        Values depend on the device's generator: a CPU and a GPU rank agree only with themselves.
        """
        device = torch.device(device or "cpu")
        gen = torch.Generator(device=device).manual_seed((self.seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
        x = torch.randn(shape, generator=gen, device=device)
        if name.endswith("norm.weight") or "layernorm" in name:
            return 1.0 + 0.1 * x
        if name.endswith(".bias"):
            return 0.1 * x
        return self.std * x
