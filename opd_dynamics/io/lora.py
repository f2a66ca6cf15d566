"""PEFT LoRA adapter directories as updates: ΔW = s·B·A, with s = α/r (α/√r with rsLoRA).

The factors are exposed as they are stored; the dense ΔW is formed only when asked (`delta`). Norms can be
had from the factors alone (`factor_fro2`), which costs an r×r product instead of an out×in one.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import torch

from opd_dynamics.errors import InputError
from opd_dynamics.io.model_dir import ModelDir
from opd_dynamics.io.naming import PEFT_PREFIX
from opd_dynamics.io.reader import ADAPTER_CONFIG, ADAPTER_FILE, TensorReader, read_settings

_LORA = re.compile(r"^(?:base_model\.model\.)?(?P<mod>.+?)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """rank_pattern / alpha_pattern lookup, matched as PEFT does (peft.utils.other.get_pattern_key)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class LoraAdapter(TensorReader):
    """A PEFT LoRA adapter, a reader of updates: per adapted base weight, the factors (B, A) and scale
    (`is_factored`, `factors`, `delta`, `delta_rows`); plus any fully saved modules (`modules_to_save`), which
    replace the base weight and are read with `get` like any weights."""

    holds_updates = True

    def __init__(self, path: str | Path, read: str = "pread", weights: str = "model", *, load_mode: str | None = None):
        self.read, _ = read_settings(read, weights, load_mode)  # ``weights``: an adapter holds one set
        self.path = Path(path)
        cfg_path = self.path / ADAPTER_CONFIG
        try:
            self.adapter_config = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(cfg_path, f"is not a readable adapter config ({e})") from e
        kind = self.adapter_config.get("peft_type", "LORA")
        if str(kind).upper() != "LORA":
            raise InputError(cfg_path, f"describes a {kind} adapter; only LoRA adapters are read (merge it into "
                                       "full weights first)")
        if self.adapter_config.get("use_dora"):
            raise InputError(cfg_path, "describes a DoRA adapter (use_dora), whose update is not s·B·A; merge it "
                                       "into full weights first")
        weights = self.path / ADAPTER_FILE
        if not weights.exists():
            pickled = sorted(p.name for p in self.path.glob("adapter_model*.bin"))
            if pickled:  # never unpickled: a .bin adapter is a pickle, and PEFT writes safetensors by default
                raise InputError(self.path / pickled[0], f"is a pickled adapter, which is not read (only "
                                                         f"{ADAPTER_FILE} is); save the adapter with "
                                                         "save_pretrained(safe_serialization=True)")
            raise InputError(self.path, f"is a LoRA adapter directory without {ADAPTER_FILE}")
        self._store = ModelDir(weights, self.read)
        self.header_sha256 = self._store.header_sha256
        cfg = json.dumps(self.adapter_config, sort_keys=True)  # α, r and their patterns change ΔW too
        self.identity = hashlib.sha256(f"{self._store.identity}\x1f{cfg}".encode()).hexdigest()[:24]
        r = self.adapter_config.get("r")
        alpha = self.adapter_config.get("lora_alpha")
        if not isinstance(r, int) or r <= 0 or alpha is None:
            raise InputError(cfg_path, "lacks a positive integer 'r' or a 'lora_alpha'")
        self._pairs: dict[str, dict[str, str]] = {}
        self._full: dict[str, str] = {}
        for name in self._store.names():
            if ".lora_embedding_" in name or ".lora_magnitude_vector" in name:
                raise InputError(weights, f"holds {name.rsplit('.', 2)[-2]} factors (embedding LoRA or DoRA), "
                                          "which are not read; merge the adapter into full weights first")
            m = _LORA.match(name)
            if m:
                self._pairs.setdefault(m["mod"] + ".weight", {})[m["ab"]] = name
            else:
                base = name.removeprefix(PEFT_PREFIX)
                self._full[base.replace(".modules_to_save.default", "")] = name
        broken = [k for k, v in self._pairs.items() if set(v) != {"A", "B"}]
        if broken:
            raise InputError(weights, f"has unpaired LoRA factors for {broken[0]!r}")
        self._r, self._alpha = r, float(alpha)

    def names(self) -> list[str]:
        """Base-model weight names this adapter changes (LoRA-adapted and fully saved)."""
        return list(self._pairs) + list(self._full)

    def __contains__(self, name: str) -> bool:
        return name in self._pairs or name in self._full

    def is_factored(self, name: str) -> bool:
        return name in self._pairs

    def scale(self, name: str) -> float:
        module = name[: -len(".weight")]
        r = int(_pattern_value(self.adapter_config.get("rank_pattern"), module, self._r))
        alpha = float(_pattern_value(self.adapter_config.get("alpha_pattern"), module, self._alpha))
        return alpha / math.sqrt(r) if self.adapter_config.get("use_rslora") else alpha / r

    def factors(self, name: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(B (out×r), A (r×in), s) with ΔW = s·B·A, upcast to `dtype`."""
        p = self._pairs[name]
        return self._store.get(p["B"]).to(dtype), self._store.get(p["A"]).to(dtype), self.scale(name)

    def delta(self, name: str, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
              ) -> torch.Tensor:
        """Dense ΔW (out×in) for an adapted weight, formed in `dtype` (at least float32) on `device`."""
        b, a, s = self.factors(name, dtype)
        return s * (b.to(device) @ a.to(device))

    def delta_rows(self, name: str, start: int, stop: int, dtype: torch.dtype = torch.float32,
                   transposed: bool = False) -> torch.Tensor:
        """Rows ``start:stop`` of ΔW as the base stores it: of s·B·A, or of (s·B·A)ᵀ for a base stored (in, out)
        (``transposed``), formed from the factors' matching rows (or columns) only."""
        b, a, s = self.factors(name, dtype)
        return (s * (b @ a[:, start:stop])).T if transposed else s * (b[start:stop] @ a)

    def factor_fro2(self, name: str) -> float:
        """‖s·B·A‖F² from the factors alone, in float64: s²·tr((BᵀB)(AAᵀ))."""
        b, a, s = self.factors(name, torch.float64)
        return float(s * s * torch.sum((b.T @ b) * (a @ a.T)))

    def shape(self, name: str) -> tuple[int, ...]:
        """A fully saved weight's stored shape; an adapted weight's (out, in), from its factors."""
        if name in self._full:
            return tuple(self._store.shape(self._full[name]))
        p = self._pairs[name]
        return (self._store.shape(p["B"])[0], self._store.shape(p["A"])[-1])

    def dtype(self, name: str) -> torch.dtype:
        return self._store.dtype(self._full.get(name) or self._pairs[name]["B"])

    def stored_dtype(self, name: str) -> str:
        return self._store.stored_dtype(self._full.get(name) or self._pairs[name]["B"])

    def get(self, name: str) -> torch.Tensor:
        """A fully saved module's weight (it replaces the base weight); an adapted weight is an update, refused."""
        return self.get_rows(name)

    def get_rows(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Rows of a fully saved module's weight, reading only their bytes."""
        if name not in self._full:
            raise InputError(self.path, f"holds {name!r} as LoRA factors (an update), not the weight itself")
        return self._store.get_rows(self._full[name], start, stop)

    def nbytes(self, name: str | None = None) -> int:
        if name is None:
            return self._store.nbytes()
        if name in self._full:
            return self._store.nbytes(self._full[name])
        return sum(self._store.nbytes(n) for n in self._pairs[name].values())

    @property
    def files(self) -> list[Path]:
        return self._store.files

    def close(self) -> None:
        self._store.close()
