"""Write a model directory from a stream of tensors: shards of bounded size, an index, atomically.

Memory stays at one shard (safetensors' `save_file` serialises a whole file at once, so the shard size is
the memory bound). Everything goes to a temporary sibling directory that is renamed into place at the end,
so an interrupted write never leaves a half model where a user expects a whole one.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shlex
import shutil
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
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
#: the kind of output `write_model` writes (extrapolate, effopd search): a model directory
MODEL = "model"
#: the file every output directory written here carries, written before the directory is renamed into place:
#: the tool, its version, the kind of output and the command that wrote it. `overwrite=True` replaces only a
#: directory carrying one of the same kind (`check_output`); a user's directory never carries one.
OUTPUT_MARKER = ".opd-dynamics-output.json"
_TOOL = "opd-dynamics"


def output_marker(directory: str | Path) -> dict | None:
    """What the marker of `directory` says (tool, version, kind, command, argv, written), or None when it holds no
    marker this toolkit wrote: none, a link, not a JSON object naming opd-dynamics and a kind."""
    p = Path(directory) / OUTPUT_MARKER
    try:
        if p.is_symlink() or not p.is_file():
            return None
        mark = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(mark, dict) and mark.get("tool") == _TOOL and isinstance(mark.get("kind"), str):
        return mark
    return None


def _command() -> str:
    """The command being run, for the marker when the writer is not told it: the command line as typed when the
    process is `opd-dynamics`, else the Python program that called the API."""
    if Path(sys.argv[0]).name == "opd-dynamics":
        return shlex.join(["opd-dynamics", *sys.argv[1:]])
    return "Python API, in: " + shlex.join(sys.argv)


def mark_output(directory: str | Path, kind: str, command: str | None = None) -> Path:
    """Write the marker (`OUTPUT_MARKER`) into `directory`, an output being built: `kind` names what it is
    ('analysis', 'model', 'lab' …; only an output of the same kind replaces it), `command` what wrote it
    (default: the command line, or the Python program calling the API)."""
    from opd_dynamics._version import __version__

    p = Path(directory) / OUTPUT_MARKER
    p.write_text(json_text({"tool": _TOOL, "version": __version__, "kind": kind, "command": command or _command(),
                            "argv": list(sys.argv), "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n",
                 encoding="utf-8")
    return p


def check_output(out: str | Path, kind: str, *, overwrite: bool = False,
                 inputs: Iterable[str | Path] = ()) -> Path:
    """Refuse, in one sentence naming `out`, an output path whose replacement would destroy what a user has:
    one that is, contains or lies inside an input directory; an existing one without `overwrite`; and even
    with it, anything but an empty directory or an earlier output of this `kind` (a directory carrying this
    toolkit's marker, `OUTPUT_MARKER`): a file, a link, or a directory that opd-dynamics did not write (however
    much it looks like an output: a run.json or model.safetensors of the user's own proves nothing)."""
    out = Path(out)
    with output_errors(out):
        o = out.resolve()
        for i in inputs:
            r = Path(i).resolve()
            if o == r or o in r.parents or r in o.parents:
                raise InputError(out, f"overlaps the input {i}; choose another output")
        if not (out.exists() or out.is_symlink()):
            _check_writable(out)
            return out
        if not overwrite:
            raise InputError(out, "already exists; pass overwrite=True to replace it", ("overwrite",))
        if not out.is_dir() or out.is_symlink():
            raise InputError(out, "is a file or a link, not an earlier output directory; it is left as it is")
        _check_writable(out)
        if not any(out.iterdir()):
            return out  # an empty directory may be used as it is
        mark = output_marker(out)
    if mark is None:
        raise InputError(out, f"was not written by opd-dynamics (it carries no {OUTPUT_MARKER}, nor do outputs of "
                              "versions before it), so overwrite=True does not replace it and it is left as it is; "
                              "remove it yourself or choose another output", ("overwrite",))
    if mark["kind"] != kind:
        raise InputError(out, f"holds an opd-dynamics output of another kind ({mark['kind']}, not {kind}; written "
                              f"by {mark.get('command', 'an unknown command')}), so overwrite=True does not replace "
                              "it and it is left as it is; choose another output", ("overwrite",))
    return out


def _check_writable(out: Path) -> None:
    """Raise the OS error that writing beside `out` would meet, before any work: the nearest existing folder above
    it is a file, or it cannot be written (a read-only file system; permission bits, which root ignores)."""
    above = next((p for p in out.absolute().parents if p.exists()), None)
    if above is None:
        return
    if not above.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(above))
    if not os.access(above, os.W_OK | os.X_OK):
        code = errno.EROFS if os.statvfs(above).f_flag & os.ST_RDONLY else errno.EACCES
        raise OSError(code, os.strerror(code), str(above))


def check_output_again(src: Path, out: Path, kind: str, *, overwrite: bool = False) -> None:
    """Before the finished output `src` replaces `out`: check `out` again, as `check_output` did at the start (the
    work may have taken hours, and a directory that appeared meanwhile is replaced only as `check_output` allows);
    a refusal keeps `src` and says where."""
    if out.exists() or out.is_symlink():
        try:
            check_output(out, kind, overwrite=overwrite)
        except InputError as e:
            raise InputError(out, f"{e.problem} (it appeared while this command ran; what it wrote is kept in {src})",
                             e.params) from None


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
def writing_for(out: Path | None, work: Path | None = None) -> Iterator[None]:
    """A sentence about a temporary path written on the way to `out` (`work`, or a hidden sibling of it; by default
    the hidden siblings of `out`: candidate models beside it) is said of `out`, the path the user gave, naming the
    temporary one in it. With `out` None, nothing changes."""
    stem = Path(work if work is not None else out) if out is not None else None
    try:
        yield
    except InputError as e:
        p = Path(e.path) if e.path and stem is not None else None
        if p is None or p == Path(out) or not (p == stem or (p.parent == stem.parent
                                                              and p.name.startswith(f".{stem.name}."))):
            raise
        said = e.problem if p.name in e.problem else f"{e.problem} (while writing {p.name})"
        raise InputError(out, said, e.params) from None


@contextmanager
def atomic_dir(out: str | Path, kind: str, overwrite: bool = False, inputs: Iterable[str | Path] = (),
               command: str | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside `out`, already carrying the marker of an output of `kind`
    (`mark_output`); on success rename it to `out`.

    `out` is checked first (see `check_output`: not overlapping `inputs`; an existing one only with
    `overwrite`, and only an empty directory or an earlier output of this kind) and again before it is replaced,
    which happens only once the new one is complete. An OS error on the output side, while the temporary directory
    is made, filled or renamed, is one sentence naming `out` (`output_errors`).
    """
    out = check_output(out, kind, overwrite=overwrite, inputs=inputs)
    with output_errors(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = hidden_sibling(out, "tmp")
        tmp.mkdir()
    try:
        with output_errors(out):
            mark_output(tmp, kind, command)
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    check_output_again(tmp, out, kind, overwrite=overwrite)
    try:
        with output_errors(out):
            replace_path(tmp, out)
    except InputError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_path(src: Path, dst: Path) -> None:
    """Move `src` to `dst`; an existing `dst` is set aside first and removed only once `src` is in place."""
    old = None
    if dst.exists() or dst.is_symlink():
        old = hidden_sibling(dst, "old")
        os.replace(dst, old)
    try:
        os.replace(src, dst)
    except OSError:
        if old is not None:  # put the earlier output back
            os.replace(old, dst)
        raise
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
    with atomic_dir(out_dir, MODEL, overwrite=overwrite) as tmp:
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
