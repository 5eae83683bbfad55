"""The results document and the files around it, without torch: schema checks, atomic writes, hashes.

Everything that reads or writes a results file — measure, render, validate, publish, gate, diff —
goes through this module, so `maxact-card diff` or `validate` never pays for importing torch.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import posixpath
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from maxact_card.errors import SchemaError, UsageError
from maxact_card.resources import load_schema

SCHEMA_VERSION = 3
#: The oldest results schema version still read: version 3 only added the per-channel companion file
#: (`channels`), so a version 2 file renders, gates and diffs as before; what needs the vectors
#: (`require_channels`) says that it predates them.
OLDEST_READABLE_VERSION = 2
RESULTS_SCHEMA = "maxact-results.schema.json"
#: The suffix of the companion file beside a results file: `results.json` → `results.channels.safetensors`.
COMPANION_SUFFIX = ".channels.safetensors"

#: Components in model order (the results schema's enum); reports list them in this order.
COMPONENTS: tuple[str, ...] = (
    "embedding", "residual", "attn_input", "query", "key_cache", "value_cache", "o_proj_input", "attention",
    "mlp_input", "mlp", "gate", "down_proj_input", "router", "final_norm",
)
#: What a W8A8 or FP8 deployment quantizes: the inputs of the Linear layers (the down_proj input
#: always, the others with --gemm-inputs) and the KV cache (with --kv-cache).
LINEAR_INPUTS: tuple[str, ...] = ("attn_input", "o_proj_input", "mlp_input", "down_proj_input")
KV_CACHE: tuple[str, ...] = ("key_cache", "value_cache")


# --- schema checks --------------------------------------------------------------------------------
def json_path(error: Any) -> str:
    """`$.a.b[0]` for a jsonschema error."""
    path = "$"
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def non_finite(doc: Any) -> str | None:
    """`$.path: message` for the first NaN or infinite number in `doc` (a JSON-like tree), else None.

    JSON Schema's "number" admits them in Python (json reads `NaN` and `Infinity`, TOML `nan` and
    `inf`), and every comparison with NaN is false: a limit of NaN would fail every model, a growth
    limit of NaN would pass every one, and a results file with one renders "∞". So no document this
    project reads may hold one. The walk is iterative: a deeply nested document cannot overflow it.
    """
    stack: list[tuple[str, Any]] = [("$", doc)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, float) and not math.isfinite(node):
            return f"{path}: {node!r} is not a finite number"
        if isinstance(node, dict):
            stack.extend((f"{path}.{key}", value) for key, value in reversed(node.items()))
        elif isinstance(node, list):
            stack.extend((f"{path}[{i}]", value) for i, value in reversed(list(enumerate(node))))
    return None


def schema_error(doc: Any, schema_name: str) -> tuple[str, int] | None:
    """The most relevant violation as `$.path: message` and how many others there are; None if valid.

    A NaN or infinite number anywhere is reported first (`non_finite`). A results document of
    another schema version reports only that: its other violations are the expected differences
    between versions, and listing them would hide what to do.
    """
    bad_number = non_finite(doc)
    if bad_number is not None:
        return bad_number, 0
    if schema_name == RESULTS_SCHEMA:
        other_version = _version_problem(doc)
        if other_version is not None:
            return other_version[0], 0
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    validator = Draft202012Validator(load_schema(schema_name), format_checker=Draft202012Validator.FORMAT_CHECKER)
    errors = list(validator.iter_errors(doc))
    if not errors:
        return None
    first = best_match(errors)
    return f"{json_path(first)}: {first.message}", len(errors) - 1


def validate_document(doc: Any, schema_name: str, *, source: str) -> None:
    """Raise SchemaError `source::$.path: message` (best match first, with a count of the rest)."""
    found = schema_error(doc, schema_name)
    if found is None:
        return
    where, rest = found
    more = f" ({rest} other error{'s' if rest != 1 else ''}; fix this one first)" if rest else ""
    raise SchemaError(f"{source}::{where}{more}")


# The hint `card.check_results` gives too: render and publish validate through `schema_error`, so with
# it every command reports an out-of-date results file in the same words.
_RERUN_HINT = "re-run `maxact-card measure` to write a valid results file"


def _version_problem(doc: Any) -> tuple[str, str] | None:
    """(`$.schema_version: ...`, what to do) for a results document of another schema version; else None."""
    version = doc.get("schema_version") if isinstance(doc, dict) else None
    if not isinstance(version, int) or isinstance(version, bool) or OLDEST_READABLE_VERSION <= version <= SCHEMA_VERSION:
        return None  # a missing or mistyped version is an ordinary schema violation
    if version < OLDEST_READABLE_VERSION:
        return f"$.schema_version: schema version {version} is older than {OLDEST_READABLE_VERSION}", _RERUN_HINT
    newer = f"schema version {version} is newer than this maxact-card understands ({SCHEMA_VERSION})"
    return f"$.schema_version: {newer}", "upgrade maxact-card, or re-run `maxact-card measure` with this version"


def validate_results(results: Any, *, source: str = "results") -> None:
    """Validate a results document; another schema version gets one line saying what to do."""
    bad_number = non_finite(results)
    if bad_number is not None:
        raise SchemaError(f"{source}::{bad_number}", hint=_RERUN_HINT)
    other_version = _version_problem(results)
    if other_version is not None:
        where, hint = other_version
        raise SchemaError(f"{source}::{where}", hint=hint)
    validate_document(results, RESULTS_SCHEMA, source=source)


def load_results(path: Path) -> dict[str, Any]:
    """Read and validate a results file; bad input raises UsageError/SchemaError (exit 2)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"results file {path} does not exist", hint="pass the file `maxact-card measure --out` wrote") from None
    except OSError as exc:
        raise UsageError(f"cannot read results file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text", hint="pass the JSON file `maxact-card measure --out` wrote") from None
    doc = parse_json(text, source=str(path))
    validate_results(doc, source=str(path))
    return doc


def parse_json(text: str, *, source: str) -> Any:
    """JSON text as Python values; malformed or absurdly nested text is bad input (UsageError)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{source} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except RecursionError:
        raise UsageError(f"{source} is nested too deeply to be a maxact-card document") from None


# --- files --------------------------------------------------------------------------------------------
def check_writable(path: Path | None, option: str) -> None:
    """Refuse, before any work, an output path that cannot be written: a folder, a path under a
    file, or a folder this process may not write into (UsageError naming the option)."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder", hint="pass the path of a file (in that folder, say)")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{option} {path} lies under {parent}, which is a file", hint="pass a path in a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: cannot write into {parent}", hint="pass a path in a folder you can write")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{option} {path} is read-only", hint="pass another path, or make it writable")


def atomic_write(path: Path, data: bytes) -> None:
    """Write through a temp file in the same folder and rename: never a half-written file.

    An existing file keeps its permission bits; a new one gets the usual umask-derived mode. A
    symbolic link stays a link: its target is what gets written.
    """
    atomic_write_set([(path, data)])


def atomic_write_set(files: list[tuple[Path, bytes]]) -> None:
    """Write several files so that all of them are new or none is: every file is written to its
    temp file first, and only when all are complete are they renamed into place, one after another
    (a card and its chart never disagree after an interruption, save in the instant between renames).
    """
    staged: list[tuple[str, Path]] = []
    try:
        for path, data in files:
            target = Path(path)
            if target.is_symlink():  # write through the link: replacing it would leave its target stale
                target = target.resolve()
            target.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_temp_files(target)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.maxact-{os.getpid()}.", suffix=".tmp",
                                       dir=target.parent)
            staged.append((tmp, target))
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.chmod(tmp, target.stat().st_mode & 0o7777 if target.exists() else 0o666 & ~_umask())
        while staged:
            tmp, target = staged[0]
            os.replace(tmp, target)
            staged.pop(0)
    except BaseException:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        raise


def _remove_stale_temp_files(path: Path) -> None:
    """Remove the temp files a killed earlier write to `path` left beside it: ours are named
    `.NAME.maxact-PID.*.tmp`, and one whose process is gone will never be renamed."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.maxact-*.tmp"):
        pid_text = stale.name[len(path.name) + 1:].split(".", 2)[1].removeprefix("maxact-")
        if pid_text.isdigit() and not _alive(int(pid_text)):
            stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # another user's process, or a number we cannot ask about: leave its file alone
    return True


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write` of UTF-8 text, line endings untouched."""
    atomic_write(path, text.encode("utf-8"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: Path, *, chunk: int = 8 << 20, stop: threading.Event | None = None) -> str:
    """The sha256 of a file, read in chunks (weight files are large). Once `stop` is set, it gives
    up between chunks and returns "" (a run that failed need not wait for the rest of the file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            if stop is not None and stop.is_set():
                return ""
            digest.update(block)
    return digest.hexdigest()


def dumps(results: dict[str, Any]) -> str:
    """The canonical text of a results file (stable key order, no NaN)."""
    return json.dumps(results, indent=1, ensure_ascii=False, allow_nan=False) + "\n"


def companion_path(results_path: Path) -> Path:
    """Where the per-channel companion of a results file lies: beside it, `<stem>.channels.safetensors`."""
    results_path = Path(results_path)
    return results_path.with_name(results_path.stem + COMPANION_SUFFIX)


def write_results(results: dict[str, Any], path: Path, *, channels: bytes | None = None,
                  sites: int | None = None) -> dict[str, Any]:
    """Validate, then write atomically; returns the document as written.

    With `channels` (the bytes of the per-channel safetensors file, `sites` vectors in it) the
    companion is written beside `path` and the document records its name and sha256 in `channels`.
    Both files are staged whole before either is renamed into place, the companion first: an
    interrupted write leaves the old pair or, for an instant, a new companion beside the old JSON,
    which names the old companion's sha256 and so is refused, never read as the new results.
    """
    path = Path(path)
    doc = dict(results)
    doc.pop("channels", None)
    if channels is not None:
        companion = companion_path(path)
        doc["channels"] = {"file": companion.name, "sha256": hashlib.sha256(channels).hexdigest(),
                           "sites": len(doc["sites"]) if sites is None else sites}
    validate_results(doc, source=str(path))
    files = [(companion_path(path), channels)] if channels is not None else []
    atomic_write_set([*files, (path, dumps(doc).encode("utf-8"))])
    return doc


# --- the per-channel companion ------------------------------------------------------------------
def require_channels(results: dict[str, Any], *, source: str, what: str) -> None:
    """Refuse (UsageError, exit 2) results that hold no per-channel vectors, saying why and what to do."""
    version = results.get("schema_version")
    if isinstance(version, int) and version < SCHEMA_VERSION:
        raise UsageError(f"{source}::$.schema_version: schema version {version} predates the per-channel vectors "
                         f"{what} needs (schema version {SCHEMA_VERSION})",
                         hint="measure again with this maxact-card and --out to write them")
    if not results.get("channels"):
        raise UsageError(f"{source} names no per-channel companion file, which {what} needs",
                         hint="it was printed rather than written: measure again with --out FILE")


def check_companion(results: dict[str, Any], data: bytes | None, *, source: str) -> None:
    """Refuse (UsageError, exit 2) a missing or altered companion of results that name one.

    `data` is the companion's bytes (None when it does not exist); `source` names the results file.
    """
    named = results.get("channels")
    if not named:
        return
    if data is None:
        raise UsageError(f"{source} names the companion file {named['file']}, which is missing beside it",
                         hint="keep the two files together (copy or upload both), or measure again")
    digest = hashlib.sha256(data).hexdigest()
    if digest != named["sha256"]:
        raise UsageError(f"the companion file {named['file']} of {source} has sha256 {digest[:12]}…, "
                         f"the results name {named['sha256'][:12]}…",
                         hint="it was altered or belongs to other results: restore it, or measure again")


def find_companion(results: dict[str, Any], results_name: str, read_beside: Callable[[str], bytes | None]) -> bytes | None:
    """The checked bytes of the companion that `results` (read from `results_name`) name; None when
    they name none. `read_beside(name)` reads a file beside the results, None when there is none.
    The companion is looked for under the name it was written with, then under the results' own stem
    (results copied with their companion under another name); the sha256 the results record decides,
    whichever is found. A missing or altered companion is a UsageError (`check_companion`)."""
    named = results.get("channels")
    if not named:
        return None
    name = named["file"]
    if "/" in name or "\\" in name or name in (".", ".."):
        raise UsageError(f"{results_name}::$.channels.file: {name!r} is not a file name beside the results")
    stem = posixpath.splitext(posixpath.basename(results_name))[0]
    data: bytes | None = None
    for candidate in dict.fromkeys((name, stem + COMPANION_SUFFIX)):
        data = read_beside(candidate)
        if data is not None:
            break
    check_companion(results, data, source=results_name)
    return data


def reader_beside(folder: Path) -> Callable[[str], bytes | None]:
    """`read_beside` for a local folder: a file's bytes, None when it does not exist."""

    def read(name: str) -> bytes | None:
        try:
            return (Path(folder) / name).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    return read


def read_companion(results: dict[str, Any], results_path: Path) -> bytes | None:
    """`find_companion` for results read from a local file."""
    return find_companion(results, str(results_path), reader_beside(Path(results_path).parent))
