"""Manifests: what made an artifact, checksums of its files, and verification.

``verify_mix`` is used by ``equi verify`` and by ``equi train`` (which refuses a mix whose shards do
not match their checksums).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from equi.schema import (DATA_DIR, MANIFEST, MIX_SCHEMA, POOL_DIR, POOL_SCHEMA, REJECTS, SCHEMA_VERSION,
                          check_schema)


def equi_version() -> str:
    try:
        from importlib.metadata import version

        return version("equi")
    except Exception:  # running from a source tree that was never installed
        return "0+unknown"


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON beside the target and rename it into place: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Build a directory beside ``target`` and rename it into place only when the block succeeds.

    An exception (or Ctrl-C) inside the block removes the half-built directory, so a crash never
    leaves something at ``target`` that looks whole. ``overwrite`` and ``inputs``: :func:`_check_target`.
    """
    target = _check_target(target, overwrite, inputs)
    work = target.with_name(f".{target.name}.partial-{os.getpid()}")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _replace_directory(work, target)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) inside :func:`resumable_directory`: the work kept for a resume is at ``work``."""

    def __init__(self, work: Path):
        super().__init__(str(work))
        self.work = work


@dataclass
class ResumableWork:
    """The work directory of a resumable stage, and whether it holds an earlier run's progress."""

    path: Path
    resumed: bool


@contextlib.contextmanager
def resumable_directory(target: str | Path, fingerprint: dict | None, overwrite: bool = False,
                        inputs: Iterable[str | Path] = ()) -> Iterator[ResumableWork]:
    """Like :func:`atomic_directory`, but an interrupted build is kept for the next run to finish.

    The work directory ``.{name}.partial`` beside ``target`` has a fixed name and holds
    ``fingerprint`` (what defines the output: config hash, input sizes and times, models). A run whose
    fingerprint matches picks up the work (``resumed=True``); any other run starts it afresh.
    ``fingerprint=None`` (e.g. stdin input) never resumes. Ctrl-C (``KeyboardInterrupt``) keeps the
    work and re-raises as :class:`Interrupted`; any other exception removes it (the input or the code
    was at fault, and a resume would repeat the fault); a hard kill leaves it as it was.
    ``overwrite`` and ``inputs``: :func:`_check_target`.
    """
    target = _check_target(target, overwrite, inputs)
    work = target.with_name(f".{target.name}.partial")
    with _exclusive(target.with_name(f".{target.name}.lock"), target):
        stamp = work / RESUME_FILE
        resumed = (fingerprint is not None and stamp.is_file()
                   and _read_json_or_none(stamp) == json.loads(json.dumps(fingerprint, default=str)))
        if not resumed:
            if work.exists():
                shutil.rmtree(work)
            work.mkdir()
            if fingerprint is not None:
                write_json_atomic(stamp, fingerprint)
        try:
            yield ResumableWork(work, resumed)
        except KeyboardInterrupt:
            raise Interrupted(work) from None
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        stamp.unlink(missing_ok=True)
        _replace_directory(work, target)


RESUME_FILE = ".resume.json"


def _check_target(target: str | Path, overwrite: bool, inputs: Iterable[str | Path] = ()) -> Path:
    """``target`` as an absolute path, once it is safe to build it and later rename it into place.

    ``overwrite`` replaces only what equi wrote (a directory with a manifest), never the directory the
    command runs in or one above it, and never a directory holding one of ``inputs``: ``--overwrite``
    with a mistyped ``--out`` must not delete the user's files.
    """
    given = target
    target = Path(os.path.abspath(target))
    if not target.name:
        raise FileExistsError(f"--out {given}: cannot write to the root directory; choose a new directory")
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{given} exists; pass --overwrite to replace it")
        if not (target.is_dir() and (target / MANIFEST).is_file()):
            raise FileExistsError(f"{given} is not an equi output (no {MANIFEST}); --overwrite replaces only what "
                                  "equi wrote: choose a new --out, or remove it yourself")
        real, here = target.resolve(), Path.cwd().resolve()
        if real == here or real in here.parents:
            raise FileExistsError(f"--out {given} holds the current directory; choose another --out")
        for path in inputs:
            if str(path) != "-" and real in Path(path).resolve().parents:
                raise FileExistsError(f"the input {path} lies inside --out {given}, which this run would replace; "
                                      "choose another --out")
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _replace_directory(work: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(work, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _exclusive(lock_path: Path, target: Path) -> Iterator[None]:
    """One writer per target: a second run on the same ``--out`` fails at once instead of sharing the work."""
    import fcntl

    with open(lock_path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(f"another run is writing {target} (lock {lock_path})") from None
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)


def _read_json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def shard_entry(root: Path, path: Path, rows: int, split: str, group: str | None = None) -> dict[str, Any]:
    entry = {"path": path.relative_to(root).as_posix(), "sha256": sha256_file(path), "rows": rows, "split": split}
    if group is not None:
        entry["group"] = group
    return entry


class MixVerificationError(Exception):
    """A mix does not match its manifest; ``problems`` lists every mismatch, first one first."""

    def __init__(self, problems: list[str]):
        super().__init__(problems[0] if problems else "mix verification failed")
        self.problems = problems


def load_manifest(mix_dir: str | Path) -> dict[str, Any]:
    path = Path(mix_dir) / MANIFEST
    if not path.is_file():
        raise MixVerificationError([f"{mix_dir}: no {MANIFEST} (not a mix directory written by equi curate)"])
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise MixVerificationError([f"{path}: not valid UTF-8"]) from None
    except json.JSONDecodeError as exc:
        raise MixVerificationError([f"{path}: not valid JSON ({exc.msg})"]) from None
    if not isinstance(manifest, dict):
        raise MixVerificationError([f"{path}: holds a JSON {type(manifest).__name__}, not an object"])
    return manifest


def verify_mix(mix_dir: str | Path, check_checksums: bool = True) -> list[str]:
    """Every way the mix differs from its manifest and the contract, as sentences; [] if it is sound."""
    import pyarrow.parquet as pq

    root = Path(mix_dir)
    if not root.is_dir():
        return [f"{root}: no such mix directory"]
    try:
        manifest = load_manifest(root)
    except MixVerificationError as exc:
        return exc.problems
    problems: list[str] = []
    if manifest.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema_version {manifest.get('schema_version')!r} is not {SCHEMA_VERSION}")
    listed = set()
    for shard in manifest.get("shards", []):
        path = root / shard["path"]
        listed.add(path.resolve())
        if not path.is_file():
            problems.append(f"{shard['path']}: missing")
            continue
        if check_checksums and sha256_file(path) != shard["sha256"]:
            problems.append(f"{shard['path']}: sha256 does not match the manifest (modified or corrupt)")
            continue
        try:
            meta = pq.ParquetFile(path)
        except Exception as exc:
            problems.append(f"{shard['path']}: not a readable Parquet file ({exc})")
            continue
        if meta.metadata.num_rows != shard["rows"]:
            problems.append(f"{shard['path']}: {meta.metadata.num_rows} rows, manifest says {shard['rows']}")
        expected = POOL_SCHEMA if shard["split"] == "pool" else MIX_SCHEMA
        difference = check_schema(meta.schema_arrow, expected)
        if difference:
            problems.append(f"{shard['path']}: {difference}")
    for folder in (DATA_DIR, POOL_DIR):
        for path in sorted((root / folder).glob("*.parquet")):
            if path.resolve() not in listed:
                problems.append(f"{path.relative_to(root).as_posix()}: shard not listed in the manifest")
    problems.extend(accounting_problems(manifest.get("accounting", {})))
    problems.extend(rejects_problems(root, manifest.get("accounting", {})))
    return problems


def rejects_problems(root: Path, acc: dict[str, Any]) -> list[str]:
    """``rejects.jsonl`` holds one line per rejected input line, as many as the manifest counts."""
    expected = acc.get("rejected") if isinstance(acc, dict) else None
    if not isinstance(expected, int):
        return []  # accounting_problems names an incomplete section
    path = root / REJECTS
    if not path.is_file():  # a mix built by other tools, with nothing rejected, may leave it out
        return [f"{REJECTS}: missing (the manifest counts {expected} rejected lines)"] if expected else []
    with open(path, "rb") as handle:
        lines = sum(1 for _ in handle)
    if lines != expected:
        return [f"{REJECTS}: {lines} lines, the manifest counts {expected} rejected lines"]
    return []


def accounting_problems(acc: dict[str, Any]) -> list[str]:
    """The contract's row accounting: ``input_lines = pooled + rejected``, ``pooled = mixed + not_selected``."""
    try:
        not_selected = sum(acc["not_selected"].values())
        problems = []
        if acc["input_lines"] != acc["pooled"] + acc["rejected"]:
            problems.append(f"accounting: input_lines {acc['input_lines']} != pooled {acc['pooled']} + "
                            f"rejected {acc['rejected']}")
        if acc["pooled"] != acc["mixed"] + not_selected:
            problems.append(f"accounting: pooled {acc['pooled']} != mixed {acc['mixed']} + "
                            f"not_selected {not_selected}")
        return problems
    except (KeyError, TypeError, AttributeError):
        return ["accounting: manifest has no complete 'accounting' section"]
