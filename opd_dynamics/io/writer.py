"""Write a model directory from a stream of tensors: shards of bounded size, an index, atomically.

Memory stays at one shard (safetensors' `save_file` serialises a whole file at once, so the shard size is
the memory bound). Everything goes to a temporary sibling directory that is renamed into place at the end,
so an interrupted write never leaves a half model where a user expects a whole one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from opd_dynamics.errors import InputError
from opd_dynamics.io.model_dir import INDEX_FILE, SINGLE_FILE

# Files a model directory carries besides weights (what from_pretrained and tokenizers need).
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
              "chat_template.jinja", "chat_template.json")
#: what every model directory written here holds: an existing one of these may be replaced
MODEL_MARKERS = (SINGLE_FILE, INDEX_FILE)


def check_output(out: str | Path, markers: Sequence[str], *, overwrite: bool = False,
                 inputs: Iterable[str | Path] = ()) -> Path:
    """Refuse, in one sentence naming `out`, an output path whose replacement would destroy what a user has:
    one that is, contains or lies inside an input directory; an existing one without `overwrite`; and even
    with it, a file, or a non-empty directory that holds none of `markers` (the files this kind of output
    always has), since that is not an earlier output of ours."""
    out = Path(out)
    o = out.resolve()
    for i in inputs:
        r = Path(i).resolve()
        if o == r or o in r.parents or r in o.parents:
            raise InputError(out, f"overlaps the input {i}; choose another output")
    if not (out.exists() or out.is_symlink()):
        return out
    if not overwrite:
        raise InputError(out, "already exists; pass overwrite=True to replace it", ("overwrite",))
    if not out.is_dir() or out.is_symlink():
        raise InputError(out, "is a file or a link, not an earlier output directory; it is left as it is")
    if any(out.iterdir()) and not any((out / m).exists() for m in markers):
        raise InputError(out, f"holds no {' or '.join(markers)}, so it is not an earlier output; it is left as it "
                              "is (remove it yourself or choose another output)")
    return out


def hidden_sibling(path: Path, kind: str, keep_suffix: bool = False) -> Path:
    """A fresh hidden path beside ``path`` for work in progress, ``.NAME.KIND-<random>`` (with ``keep_suffix``,
    ``.STEM.KIND-<random>.SUFFIX``, for writers that read the format from the suffix)."""
    tag = uuid.uuid4().hex[:8]
    if keep_suffix:
        return path.parent / f".{path.stem}.{kind}-{tag}{path.suffix}"
    return path.parent / f".{path.name}.{kind}-{tag}"


@contextmanager
def output_errors(out: Path | None, partial: Path | None = None) -> Iterator[None]:
    """An OS error while writing towards `out` (a read-only file system, no space left, permission denied, a file
    where a folder must go) becomes one sentence naming the output instead of a traceback; when `partial` holds
    what was computed, the sentence says it is kept and that a rerun resumes from it. Readers turn their own OS
    errors into sentences naming the input, so what arrives here is the output's."""
    try:
        yield
    except OSError as e:
        if out is None:
            raise
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        kept = (f"; what was computed is kept in {partial}, and rerunning the same command resumes from it"
                if partial is not None and partial.exists() else "")
        raise InputError(out, f"cannot be written: {e.strerror or e}{where}{kept}") from None


@contextmanager
def atomic_dir(out: str | Path, markers: Sequence[str], overwrite: bool = False,
               inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success rename it to `out`.

    `out` is checked first (see `check_output`: not overlapping `inputs`; an existing one only with
    `overwrite` and only an earlier output); it is replaced only after the new one is complete. An OS error on
    the output side is one sentence (`output_errors`).
    """
    out = check_output(out, markers, overwrite=overwrite, inputs=inputs)
    with output_errors(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = hidden_sibling(out, "tmp")
        tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with output_errors(out):
        replace_path(tmp, out)


def replace_path(src: Path, dst: Path) -> None:
    """Move `src` to `dst`; an existing `dst` is set aside first and removed only once `src` is in place."""
    old = None
    if dst.exists():
        old = hidden_sibling(dst, "old")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix, so writers that read the format from it still
    can); on success rename it to `path`; on failure remove it, leaving any existing `path` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = hidden_sibling(path, "tmp", keep_suffix=True)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                     metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, with the permissions any other new file gets (0666 less the umask):
    safetensors 0.8 creates its files 0600, unreadable to the colleagues and evaluation jobs of a shared
    cluster."""
    save_file(tensors, str(path), metadata=metadata)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _plain(x):
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(x) else float(x)
    return x


def json_text(obj) -> str:
    """Strict JSON (what jq and JSON.parse accept): NaN and infinities become null, numpy scalars numbers,
    paths and other objects their str()."""
    return json.dumps(_plain(obj), indent=2, default=str, allow_nan=False)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a UTF-8 text file under a temporary name, then rename it."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


#: the largest shard write_model writes by default: 2 GB (10^9 bytes, as Hugging Face counts "2GB")
DEFAULT_SHARD_BYTES = 2 * 10**9


def write_model(tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str | Path, *,
                metadata: dict[str, str] | None = None, copy_files_from: str | Path | None = None,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False) -> Path:
    """Write (name, tensor) pairs as a Hugging Face safetensors model directory.

    One `model.safetensors` if everything fits a shard, else `model-0000i-of-0000n.safetensors` plus
    `model.safetensors.index.json`. `metadata` goes into every shard's header (string values);
    config and tokenizer files are copied from `copy_files_from`.
    """
    meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    with atomic_dir(out_dir, MODEL_MARKERS, overwrite=overwrite) as tmp:
        shards: list[dict[str, str]] = []
        weight_map: dict[str, str] = {}
        total = 0
        current: dict[str, torch.Tensor] = {}
        size = 0

        def flush() -> None:
            nonlocal current, size
            if not current:
                return
            fname = f"shard-{len(shards):05d}.safetensors"
            save_safetensors(current, tmp / fname, metadata=meta)
            shards.append({"file": fname, "names": list(current)})
            current, size = {}, 0

        for name, t in tensors:
            if name in weight_map or name in current:
                raise ValueError(f"tensor {name!r} written twice")
            nbytes = t.numel() * t.element_size()
            if current and size + nbytes > max_shard_bytes:
                flush()
            current[name] = t.detach().contiguous().cpu()
            size += nbytes
            total += nbytes
        flush()
        if not shards:
            raise ValueError(f"nothing to write to {out_dir}")
        n = len(shards)
        for i, sh in enumerate(shards):
            final = SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp / sh["file"], tmp / final)
            weight_map.update({name: final for name in sh["names"]})
        if n > 1:
            index = {"metadata": {"total_size": total, **meta}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        if copy_files_from is not None:
            src = Path(copy_files_from)
            for f in SIDE_FILES:
                if (src / f).is_file():
                    shutil.copy2(src / f, tmp / f)
    return Path(out_dir)


@contextmanager
def output_lock(out: Path | None) -> Iterator[None]:
    """Hold an exclusive lock beside `out` while this process works towards it (two analyses writing one output
    would share its .OUT.partial/); a second holder is refused with one sentence."""
    if out is None:
        yield
        return
    import fcntl

    lock = out.parent / f".{out.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(5):
        f = open(lock, "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise InputError(out, "is being written by another analyze right now; wait for it or choose another "
                                  "output") from None
        try:  # the holder before us removes the file on leaving: a lock on a removed file guards nothing
            if os.stat(lock).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()
    else:
        raise InputError(out, f"could not lock {lock.name}: it was replaced five times in a row")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still holding it, then release
        f.close()
