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
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator

from equi.errors import EquiError, OutputExistsError, OutputNotWritable, VerificationError
from equi.schema import (CARD, DATA_DIR, MANIFEST, POOL_DIR, REJECTS, SCHEMA_VERSION, SPLITS, check_schema,
                         is_multimodal, mix_schema, pool_schema)


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
        except OSError as exc:  # disk full, permissions, I/O: not the input's fault, so the scored work is kept
            if fingerprint is None:
                shutil.rmtree(work, ignore_errors=True)
                raise
            raise WorkKept(work, exc) from exc
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        stamp.unlink(missing_ok=True)
        _replace_directory(work, target)


RESUME_FILE = ".resume.json"


class WorkKept(EquiError):
    """An error of the machine, not of the input (disk full, a file that could not be written), inside
    :func:`resumable_directory`: the work so far is kept at ``work`` and the same command resumes it."""

    def __init__(self, work: Path, cause: OSError):
        reason = cause.strerror or str(cause)
        where = f" ({cause.filename})" if getattr(cause, "filename", None) else ""
        super().__init__(f"{reason}{where}: the work so far is kept in {work}; fix this and run the same command "
                         "again to resume")
        self.work, self.cause = work, cause


def check_writable(target: str | Path, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> None:
    """Fail early (before loading models) when ``target`` cannot be built beside itself: a read-only or
    missing parent is a ``PermissionError`` naming it; :func:`_check_target`'s checks apply too."""
    try:
        target = _check_target(target, overwrite, inputs)
        probe = target.with_name(f".{target.name}.probe-{os.getpid()}")
        probe.mkdir()
        probe.rmdir()
    except OutputExistsError:
        raise
    except OSError as exc:
        raise OutputNotWritable(f"cannot write --out {target}: {exc.strerror or exc} "
                              f"({Path(os.path.abspath(target)).parent})") from None


def _check_target(target: str | Path, overwrite: bool, inputs: Iterable[str | Path] = ()) -> Path:
    """``target`` as an absolute path, once it is safe to build it and later rename it into place.

    ``overwrite`` replaces only what equi wrote (a directory with a manifest), never the directory the
    command runs in or one above it, and never a directory holding one of ``inputs``: ``--overwrite``
    with a mistyped ``--out`` must not delete the user's files.
    """
    given = target
    target = Path(os.path.abspath(target))
    if not target.name:
        raise OutputExistsError(f"--out {given}: cannot write to the root directory; choose a new directory")
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"{given} exists; pass --overwrite to replace it")
        if not (target.is_dir() and (target / MANIFEST).is_file()):
            raise OutputExistsError(f"{given} is not an equi output (no {MANIFEST}); --overwrite replaces only what "
                                  "equi wrote: choose a new --out, or remove it yourself")
        real, here = target.resolve(), Path.cwd().resolve()
        if real == here or real in here.parents:
            raise OutputExistsError(f"--out {given} holds the current directory; choose another --out")
        for path in inputs:
            if str(path) != "-" and real in Path(path).resolve().parents:
                raise OutputExistsError(f"the input {path} lies inside --out {given}, which this run would replace; "
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
            raise OutputExistsError(f"another run is writing {target} (lock {lock_path})") from None
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)


def _read_json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def shard_entry(root: Path, path: Path, rows: int, split: str, groups: dict[str, int] | None = None) -> dict[str, Any]:
    """A manifest ``shards`` entry; ``groups``: a mixture shard's rows by group (``equi verify`` checks them)."""
    entry = {"path": path.relative_to(root).as_posix(), "sha256": sha256_file(path), "rows": rows, "split": split}
    if groups is not None:
        entry["groups"] = dict(sorted(groups.items()))
    return entry


class MixVerificationError(VerificationError):
    """A mix does not match its manifest; ``problems`` lists every mismatch, first one first; ``message`` (default:
    the first problem) is what the user reads."""

    def __init__(self, problems: list[str], message: str | None = None):
        super().__init__(message or (problems[0] if problems else "mix verification failed"), problems)


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


def file_checksums(root: Path, names: Iterable[str]) -> dict[str, str]:
    """The ``files`` section of a manifest: sha256 of each named non-shard file that exists (card, rejects, audit).

    Written after those files and before the manifest, so ``equi verify`` can tell an edited card or rejects file
    from the one curate wrote; the card never holds the manifest's hash, so the order has no cycle.
    """
    return {name: sha256_file(root / name) for name in names if (root / name).is_file()}


def verify_mix(mix_dir: str | Path, check_checksums: bool = True) -> list[str]:
    """Every way the mix differs from its manifest and the contract, as sentences; [] if it is sound.

    Checks every claim of the manifest against the files themselves, not only checksums: each listed file's
    sha256, no unlisted file, shard paths inside the mix, per shard the row count and every row's ``split`` and
    ``group``, counts by group × split, and the row accounting recomputed from pool shards and rejects. A
    malformed manifest is a problem named here, never an exception.
    """
    root = Path(mix_dir)
    if not root.is_dir():
        return [f"{root}: no such mix directory"]
    try:
        manifest = load_manifest(root)
    except MixVerificationError as exc:
        return exc.problems
    problems: list[str] = []
    if manifest.get("schema_version") != SCHEMA_VERSION:
        problems.append(schema_version_problem(manifest))
    shards, shape_problems = _well_formed_shards(root, manifest.get("shards"))
    problems += shape_problems
    files, files_problems = _well_formed_files(manifest.get("files"))
    problems += files_problems
    problems += _outside_problems(root, sorted(files))
    problems += _unlisted_problems(root, {s["path"] for s in shards} | set(files))
    problems += _listed_file_problems(root, files, check_checksums)
    if CARD in files and not shape_problems:
        problems += card_problems(root, shards)
    observed = _ObservedRows()
    multimodal = manifest.get("multimodal", False)
    if not isinstance(multimodal, bool):
        problems.append(f"manifest: 'multimodal' is {multimodal!r}, not true or false")
    for shard in shards:
        problems += _shard_problems(root, shard, observed, check_checksums, multimodal is True)
    if not shape_problems:  # counts from an incomplete reading would only repeat the shard's problem
        problems += counts_problems(manifest.get("counts"), observed)
    acc = manifest.get("accounting", {})
    problems += accounting_problems(acc, None if shape_problems else observed)
    problems += inputs_problems(manifest.get("inputs"), acc)
    problems += rejects_problems(root, acc)
    return problems


def schema_version_problem(manifest: dict[str, Any]) -> str:
    """The problem with a mix of another schema version, with what to do about it."""
    version = manifest.get("schema_version")
    inputs = [item.get("path") for item in manifest.get("inputs", []) if isinstance(item, dict)] \
        if isinstance(manifest.get("inputs"), list) else []
    again = f"equi curate {' '.join(str(p) for p in inputs if p) or 'INPUTS'} --out NEW_MIX"
    if isinstance(version, int) and not isinstance(version, bool) and version < SCHEMA_VERSION:
        return (f"schema_version {version}: written by an older equi (schema 2 stored text columns and an 'eval' "
                f"split; schema {SCHEMA_VERSION} stores TRL's conversational messages and a 'test' split); "
                f"re-curate it from its inputs: {again}")
    return f"schema_version {version!r} is not {SCHEMA_VERSION} (this equi reads schema {SCHEMA_VERSION} mixes)"


SHA256_HEX = frozenset("0123456789abcdef")


def _is_count(value: Any) -> bool:
    """A row or line count: a non-negative int (JSON ``true`` is not a count)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= SHA256_HEX


def _well_formed_shards(root: Path, entries: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """The shard entries that have every field a check needs, and a problem naming each one that does not."""
    if not isinstance(entries, list):
        return [], [f"manifest: 'shards' is {type(entries).__name__}, not a list of shard entries"]
    good, problems, seen = [], [], set()
    for index, entry in enumerate(entries):
        problem = _shard_entry_problem(root, entry)
        if problem is None and entry["path"] in seen:
            problem = f"path {entry['path']!r} is listed twice"
        if problem:
            problems.append(f"manifest: shard entry {index} ({_entry_name(entry)}): {problem}")
            continue
        seen.add(entry["path"])
        good.append(entry)
    return good, problems


def _shard_entry_problem(root: Path, entry: Any) -> str | None:
    """What is wrong with one shard entry's shape or place, or None."""
    if not isinstance(entry, dict):
        return f"is a JSON {type(entry).__name__}, not an object"
    if not isinstance(entry.get("path"), str) or not entry["path"]:
        return "has no 'path' string"
    if not _is_sha256(entry.get("sha256")):
        return "has no 'sha256' (64 lowercase hex digits)"
    if not _is_count(entry.get("rows")):
        return f"'rows' is {entry.get('rows')!r}, not a non-negative integer"
    if not isinstance(entry.get("split"), str):
        return "has no 'split' string"
    if entry["split"] not in ("pool", *SPLITS):
        return f"split {entry['split']!r} is none of pool, {', '.join(SPLITS)}"
    if "groups" in entry and not (isinstance(entry["groups"], dict)
                                  and all(isinstance(g, str) and _is_count(n) for g, n in entry["groups"].items())):
        return f"'groups' is {entry['groups']!r}, not an object of group: row count"
    if not _inside(root, entry["path"]):
        return "path leads outside the mix directory"
    folder = POOL_DIR if entry["split"] == "pool" else DATA_DIR
    if not entry["path"].startswith(f"{folder}/"):
        return f"a {entry['split']!r} shard must lie under {folder}/"
    if entry["split"] != "pool" and not PurePosixPath(entry["path"]).name.startswith(f"{entry['split']}-"):
        # datasets assigns splits by file name, so the name must agree with the split the manifest claims.
        return f"file name does not start with {entry['split']!r}-, so datasets would read it as another split"
    return None


def _entry_name(entry: Any) -> str:
    return repr(entry["path"]) if isinstance(entry, dict) and isinstance(entry.get("path"), str) else "no path"


def _well_formed_files(files: Any) -> tuple[dict[str, str], list[str]]:
    """The ``files`` section (non-shard file -> sha256); an older manifest without one is refused."""
    if files is None:
        return {}, [f"manifest: no 'files' section with the sha256 of {CARD} and {REJECTS} (written by an older "
                    "equi): re-curate the mix"]
    if not isinstance(files, dict):
        return {}, [f"manifest: 'files' is {type(files).__name__}, not an object of path: sha256"]
    good, problems = {}, []
    for name, sha in files.items():
        if name == MANIFEST or not _is_sha256(sha):
            problems.append(f"manifest: files entry {name!r}: "
                            + ("the manifest cannot list itself" if name == MANIFEST else
                               f"sha256 {sha!r} is not 64 lowercase hex digits"))
        else:
            good[name] = sha
    if CARD not in files:
        problems.append(f"manifest: 'files' does not list {CARD} (the data card decides what load_dataset reads)")
    return good, problems


def _inside(root: Path, relative: str) -> bool:
    """Whether ``relative`` names a place inside ``root``, after symlinks: never absolute, never ``..``."""
    posix = PurePosixPath(relative)
    if posix.is_absolute() or Path(relative).is_absolute() or ".." in posix.parts or "\\" in relative:
        return False
    real_root = root.resolve()
    target = (root / relative).resolve()
    return target == real_root or real_root in target.parents


def _outside_problems(root: Path, paths: list[str]) -> list[str]:
    return [f"{path}: path leads outside the mix directory" for path in paths if not _inside(root, path)]


def _unlisted_problems(root: Path, listed: set[str]) -> list[str]:
    """Every file (or symlink) in the mix that the manifest does not list: nothing may ride along unchecked."""
    problems = []
    for folder, dirs, names in os.walk(root):
        here = Path(folder)
        for name in sorted(dirs):
            if (here / name).is_symlink():
                problems.append(f"{(here / name).relative_to(root).as_posix()}: a symlink, not part of an equi mix")
        for name in sorted(names):
            path = here / name
            relative = path.relative_to(root).as_posix()
            if path.is_symlink():
                problems.append(f"{relative}: a symlink, not part of an equi mix")
            elif relative != MANIFEST and relative not in listed:
                kind = "shard" if path.suffix == ".parquet" else "file"
                problems.append(f"{relative}: {kind} not listed in the manifest")
    return problems


def _listed_file_problems(root: Path, files: dict[str, str], check_checksums: bool) -> list[str]:
    problems = []
    for name, sha in files.items():
        path = root / name
        if not _inside(root, name) or path.is_symlink():
            continue  # named by _outside_problems / _unlisted_problems
        if not path.is_file():
            problems.append(f"{name}: missing (the manifest lists it)")
        elif check_checksums and sha256_file(path) != sha:
            problems.append(f"{name}: sha256 does not match the manifest (modified or corrupt)")
    return problems


def card_problems(root: Path, shards: list[dict[str, Any]]) -> list[str]:
    """The card's default config must load, per split, exactly the mixture shards of that split.

    ``load_dataset("mix/")`` and ``trl dpo --dataset_name mix/`` read the card's YAML, not the manifest: a card
    whose checksum was updated along with an edit could otherwise serve the pool, or test rows, as train.
    """
    mixture: dict[str, set[str]] = {}
    for shard in shards:
        if shard["split"] != "pool":
            mixture.setdefault(shard["split"], set()).add(shard["path"])
    if not mixture or not (root / CARD).is_file() or (root / CARD).is_symlink():
        return []  # a pool-only mix has no mixture to serve; a missing card is named by _listed_file_problems
    try:
        served = _default_config_files(root, (root / CARD).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        return [f"{CARD}: {exc}"]
    if served != mixture:
        return [f"{CARD}: the default config serves {_compact({k: sorted(v) for k, v in served.items()})}, "
                f"not the manifest's mixture shards {_compact({k: sorted(v) for k, v in mixture.items()})}"]
    return []


def _default_config_files(root: Path, card: str) -> dict[str, set[str]]:
    """Split -> mix-relative files that the card's default config names (its globs expanded); ValueError if none."""
    import yaml

    if not card.startswith("---"):
        raise ValueError("no YAML front matter, so no default config")
    try:
        front = yaml.safe_load(card.split("---", 2)[1])
    except (yaml.YAMLError, IndexError) as exc:
        raise ValueError(f"front matter is not valid YAML ({type(exc).__name__})") from None
    configs = front.get("configs") if isinstance(front, dict) else None
    defaults = [c for c in (configs if isinstance(configs, list) else [])
                if isinstance(c, dict) and (c.get("default") or c.get("config_name") == "default")]
    if not defaults:
        raise ValueError("front matter declares no default config")
    data_files = defaults[0].get("data_files")
    if isinstance(data_files, (str, list)) and all(isinstance(d, str) for d in _as_list(data_files)):
        data_files = [{"split": "train", "path": data_files}]
    if isinstance(data_files, dict):
        data_files = [{"split": k, "path": v} for k, v in data_files.items()]
    if not isinstance(data_files, list) or not all(isinstance(d, dict) for d in data_files):
        raise ValueError("the default config's data_files cannot be read")
    served: dict[str, set[str]] = {}
    for item in data_files:
        for pattern in _as_list(item.get("path")):
            if not isinstance(pattern, str) or not pattern or PurePosixPath(pattern).is_absolute():
                raise ValueError(f"the default config names {pattern!r}, not a path inside the mix")
            try:
                matches = list(root.glob(pattern))
            except (ValueError, NotImplementedError, OSError) as exc:
                raise ValueError(f"the default config's path {pattern!r} cannot be expanded ({exc})") from None
            found = {p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p) for p in matches}
            served.setdefault(str(item.get("split", "train")), set()).update(found or {pattern})
    return served


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


@dataclass
class _ObservedRows:
    """What the shards themselves hold: rows per kind and counts by group (× split for the mixture)."""

    pool_rows: int = 0
    mixture_rows: int = 0
    pool: dict[Any, int] = field(default_factory=dict)
    mixture: dict[Any, dict[Any, int]] = field(default_factory=dict)
    complete: bool = True  # False once a shard could not be read: recomputed counts are then partial


def _shard_problems(root: Path, shard: dict[str, Any], observed: _ObservedRows, check_checksums: bool,
                    multimodal: bool = False) -> list[str]:
    """One shard against its entry: present, inside, checksum, schema (image columns as the manifest says), row
    count, every row's split and group."""
    import pyarrow.parquet as pq

    name = shard["path"]
    path = root / name
    if not _inside(root, name) or path.is_symlink():
        observed.complete = False
        return []  # named by _outside_problems / _unlisted_problems; never read a file outside the mix
    if not path.is_file():
        observed.complete = False
        return [f"{name}: missing"]
    if check_checksums and sha256_file(path) != shard["sha256"]:
        observed.complete = False
        return [f"{name}: sha256 does not match the manifest (modified or corrupt)"]
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:
        observed.complete = False
        return [f"{name}: not a readable Parquet file ({exc})"]
    problems = []
    is_pool = shard["split"] == "pool"
    difference = check_schema(parquet.schema_arrow, (pool_schema if is_pool else mix_schema)(multimodal))
    if difference and is_multimodal(parquet.schema_arrow) != multimodal:
        difference = ("has image columns, but the manifest says the mix is text-only" if not multimodal else
                      "has no image columns, but the manifest says the mix is multimodal")
    if difference:
        observed.complete = False
        return [f"{name}: {difference}"]
    try:
        rows, counts = _group_split_counts(parquet)
    except Exception as exc:
        observed.complete = False
        return [f"{name}: rows could not be read ({exc})"]
    if rows != shard["rows"]:
        problems.append(f"{name}: {rows} rows, manifest says {shard['rows']}")
    if is_pool:
        observed.pool_rows += rows
        for (group, _split), n in counts.items():
            observed.pool[group] = observed.pool.get(group, 0) + n
        return problems
    observed.mixture_rows += rows
    for (group, split), n in counts.items():
        by_split = observed.mixture.setdefault(group, {})
        by_split[split] = by_split.get(split, 0) + n
    wrong_split = sum(n for (_g, split), n in counts.items() if split != shard["split"])
    if wrong_split:
        problems.append(f"{name}: {wrong_split} row(s) have a split other than {shard['split']!r}, "
                        "the split its manifest entry claims")
    if "groups" in shard:
        held: dict[str, int] = {}
        for (group, _split), n in counts.items():
            held[str(group)] = held.get(str(group), 0) + n
        if held != shard["groups"]:
            problems.append(f"{name}: rows by group {_compact(held)}, not {_compact(shard['groups'])} as its "
                            "manifest entry claims")
    return problems


def _group_split_counts(parquet: Any, batch_rows: int = 65_536) -> tuple[int, dict[tuple[Any, Any], int]]:
    """Rows of a shard by (group, split), reading only those two columns a batch at a time (streaming)."""
    import pyarrow as pa

    rows, counts = 0, {}
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=["group", "split"]):
        rows += batch.num_rows
        if not batch.num_rows:
            continue
        grouped = pa.Table.from_batches([batch]).group_by(["group", "split"]).aggregate([([], "count_all")])
        for group, split, n in zip(grouped["group"].to_pylist(), grouped["split"].to_pylist(),
                                   grouped["count_all"].to_pylist()):
            counts[(group, split)] = counts.get((group, split), 0) + n
    return rows, counts


def counts_problems(counts: Any, observed: _ObservedRows) -> list[str]:
    """The manifest's counts by group × split (mixture) and by group (pool) against the rows of the shards."""
    if not observed.complete:
        return []  # a shard could not be read; its own problem is named already
    if not isinstance(counts, dict) or not isinstance(counts.get("pool"), dict) \
            or not isinstance(counts.get("mixture"), dict):
        return ["counts: manifest has no 'counts' object with 'pool' and 'mixture'"]
    problems = []
    claimed_mix = {g: s for g, s in counts["mixture"].items() if not (isinstance(s, dict) and not s)}
    if claimed_mix != observed.mixture:
        problems.append(f"counts: mixture counts by group × split {_compact(counts['mixture'])} do not match the "
                        f"shards' rows {_compact(observed.mixture)}")
    if counts["pool"] != observed.pool:
        problems.append(f"counts: pool counts by group {_compact(counts['pool'])} do not match the shards' rows "
                        f"{_compact(observed.pool)}")
    return problems


def _compact(value: Any) -> str:
    """Counts as short JSON; a null group or split (a damaged row) shows as "null", not a crash."""
    def keyed(v: Any) -> Any:
        return {str(k) if k is not None else "null": keyed(x) for k, x in v.items()} if isinstance(v, dict) else v

    return json.dumps(keyed(value), sort_keys=True, default=str)


def inputs_problems(inputs: Any, acc: Any) -> list[str]:
    """The input files' line counts add up to ``input_lines`` (checked when every input entry has them)."""
    if not isinstance(inputs, list) or not isinstance(acc, dict) or not _is_count(acc.get("input_lines")):
        return []
    lines = [item.get("lines") if isinstance(item, dict) else None for item in inputs]
    if not lines or not all(_is_count(n) for n in lines):
        return []
    if sum(lines) != acc["input_lines"]:
        return [f"accounting: input_lines {acc['input_lines']} != {sum(lines)}, the lines of the inputs listed"]
    return []


def rejects_problems(root: Path, acc: dict[str, Any]) -> list[str]:
    """``rejects.jsonl`` holds one line per rejected input line, as many as the manifest counts."""
    expected = acc.get("rejected") if isinstance(acc, dict) else None
    if not isinstance(expected, int):
        return []  # accounting_problems names an incomplete section
    path = root / REJECTS
    if path.is_symlink():
        return []  # named by _unlisted_problems; never read a file outside the mix
    if not path.is_file():  # a mix built by other tools, with nothing rejected, may leave it out
        return [f"{REJECTS}: missing (the manifest counts {expected} rejected lines)"] if expected else []
    with open(path, "rb") as handle:
        lines = sum(1 for _ in handle)
    if lines != expected:
        return [f"{REJECTS}: {lines} lines, the manifest counts {expected} rejected lines"]
    return []


def accounting_problems(acc: Any, observed: _ObservedRows | None = None) -> list[str]:
    """The contract's row accounting: ``input_lines = pooled + rejected``, ``pooled = mixed + not_selected``.

    With ``observed`` (the rows verify_mix read from the shards) the numbers must also be true, not merely
    balanced: ``pooled`` is the pool shards' rows and ``mixture_rows`` the mixture shards' rows (``rejected`` is
    checked against ``rejects.jsonl`` by :func:`rejects_problems`).
    """
    incomplete = ["accounting: manifest has no complete 'accounting' section"]
    if not isinstance(acc, dict):
        return incomplete
    keys = ("input_lines", "pooled", "rejected", "mixed")
    not_selected = acc.get("not_selected")
    if not all(_is_count(acc.get(k)) for k in keys) or not isinstance(not_selected, dict) \
            or not all(_is_count(v) for v in not_selected.values()):
        return incomplete
    skipped = sum(not_selected.values())
    problems = []
    if acc["input_lines"] != acc["pooled"] + acc["rejected"]:
        problems.append(f"accounting: input_lines {acc['input_lines']} != pooled {acc['pooled']} + "
                        f"rejected {acc['rejected']}")
    if acc["pooled"] != acc["mixed"] + skipped:
        problems.append(f"accounting: pooled {acc['pooled']} != mixed {acc['mixed']} + "
                        f"not_selected {skipped}")
    if observed is None or not observed.complete:
        return problems
    if acc["pooled"] != observed.pool_rows:
        problems.append(f"accounting: pooled {acc['pooled']}, but the pool shards hold {observed.pool_rows} rows")
    if not _is_count(acc.get("mixture_rows")):
        problems.append("accounting: no 'mixture_rows' count")
    elif acc["mixture_rows"] != observed.mixture_rows:
        problems.append(f"accounting: mixture_rows {acc['mixture_rows']}, but the mixture shards hold "
                        f"{observed.mixture_rows} rows")
    return problems
