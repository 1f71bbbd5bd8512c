"""Folders curate writes: which are its own, who may write them, what it may delete.

A run folder holds days of download and GPU work, and its path is typed by
hand (``--output``). Three rules keep it and everything around it safe:

* **curate writes only into a folder it made.** A marker file (``.curate``,
  naming the folder's kind: run, compare, demo) is written when the folder is
  created; a non-empty folder without it, or with another kind, is refused.
* **One writer at a time.** An exclusive ``flock`` on ``.curate-lock`` is held
  for the whole run; the file names its holder (pid, host, command, start). The
  kernel drops the lock when its holder dies, so a lock left by a killed run is
  taken over, with a line naming the run that left it.
* **curate deletes only inside a folder it marked** (``remove_tree``): never a
  path that leaves it, never through or at a symbolic link.

Scratch space a function needs for a moment is a ``tempfile`` folder of a
unique name instead: it can only ever hold what curate put there.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from curate.core.config import ConfigError

MARKER = ".curate"
LOCK = ".curate-lock"

#: Folders this process holds the lock of, with how many nested claims hold each.
_held: dict[Path, list] = {}


class RunFolderError(Exception):
    """A folder curate must not write, delete or share; the message says what to do."""


#: A name that becomes one path component (``stages/NN_NAME``, ``checkpoints/NAME``).
PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")


def check_name(name: object, what: str = "name") -> str:
    """``name`` if it is a plain name: ASCII letters, digits, ``_`` and ``-``, never a path.

    ``../x``, ``a/b`` or ``.hidden`` would put curate's folders, and its deletes, elsewhere.
    """
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name):
        raise ConfigError(
            f"{what} {name!r} is not a plain name (letters, digits, _ and -, not starting "
            "with -, at most 64): it names a folder"
        )
    return name


def _kind_of(folder: Path) -> str | None:
    try:
        return json.loads((folder / MARKER).read_text())["kind"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_apart(folder: Path, input_path: Path | None) -> None:
    """The output is not the input, inside it, or around it: each would read its own files."""
    if input_path is None:
        return
    out, inp = folder.resolve(), Path(input_path).resolve()
    if out == inp or out.is_relative_to(inp) or inp.is_relative_to(out):
        raise RunFolderError(
            f"--output {folder} and --input {input_path} overlap; a run folder must lie "
            "outside its input and hold no input of its own"
        )


def _mark(folder: Path, kind: str) -> None:
    """Create ``folder`` if needed and mark it; refuse one that holds files of someone else."""
    if folder.is_symlink() and not folder.exists():
        raise RunFolderError(f"{folder}: a symbolic link to nothing; remove it or fix it")
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"{folder}: exists and is not a folder")
    found = _kind_of(folder) if folder.is_dir() else None
    if found == kind:
        return
    if found is not None:
        raise RunFolderError(f"{folder} is a curate {found} folder, not a {kind} folder")
    if folder.is_dir() and any(folder.iterdir()):
        raise RunFolderError(
            f"{folder} holds files and is not a curate {kind} folder (no {MARKER} in it); "
            "curate writes only into a new or empty folder: choose another"
        )
    folder.mkdir(parents=True, exist_ok=True)
    record = {"kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = folder / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(folder / MARKER)


def _holder() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv),
    }


def _describe(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']}, started {h['started']}: {h['command']}"
    except (ValueError, KeyError, TypeError):
        return "a process that left no description, such as a run that shares its stages (--from)"


def _lock(handle, mode: int, what: str) -> None:
    """``flock`` the open lock file without waiting; taken, an error naming its holder."""
    try:
        fcntl.flock(handle, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        raise RunFolderError(
            f"{what} is in use by another curate run ({_describe(handle.read())}); "
            "wait for it to finish or stop it"
        ) from None


@contextlib.contextmanager
def claim(folder: Path, kind: str = "run", input_path: Path | None = None) -> Iterator[Path]:
    """Hold ``folder`` (created and marked as ``kind`` if new) for this process alone.

    Nested claims of one folder in one process share the lock. A second process
    stops at once with the holder named.
    """
    folder = Path(folder)
    _check_apart(folder, input_path)
    key = folder.resolve()
    if key in _held:
        if _kind_of(key) != kind:
            raise RunFolderError(f"{folder} is a curate {_kind_of(key)} folder, not a {kind}")
        _held[key][1] += 1
        try:
            yield folder
        finally:
            _held[key][1] -= 1
        return
    _mark(folder, kind)
    handle = open(folder / LOCK, "a+")  # noqa: SIM115 (held until the claim ends)
    try:
        _lock(handle, fcntl.LOCK_EX, str(folder))
        handle.seek(0)
        left = handle.read().strip()
        if left:
            print(
                f"curate: {folder}: taking over the lock left by a run that is no longer "
                f"running ({_describe(left)})",
                file=sys.stderr,
            )
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(_holder()) + "\n")
        handle.flush()
        _held[key] = [handle, 1]
        try:
            yield folder
        finally:
            del _held[key]
            handle.seek(0)
            handle.truncate()  # an empty lock file: nobody to take over from
    finally:
        handle.close()  # closing drops the flock


def remove_tree(path: Path, owner: Path) -> None:
    """Delete ``path`` (a folder or a file) inside ``owner``, a folder curate marked.

    Refused, with the path named: an owner without curate's marker, a path that
    leaves the owner (``..``, or a symbolic link on the way), and a symbolic link
    where curate expects its own folder (deleting through it would reach outside).
    """
    owner, path = Path(owner), Path(path)
    if _kind_of(owner) is None:
        raise RunFolderError(f"{owner}: not a folder curate made (no {MARKER}); deleting nothing")
    home = owner.resolve()
    if path.name in ("", ".", ".."):
        raise RunFolderError(f"{path}: not a name curate deletes")
    target = path.parent.resolve() / path.name
    if target == home or not target.is_relative_to(home):
        raise RunFolderError(f"{path} is outside {owner}; curate deletes only inside its folders")
    if target.is_symlink():
        raise RunFolderError(
            f"{path} is a symbolic link where curate keeps its own files; remove the link "
            "yourself (curate will not delete through it) and re-run"
        )
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()


@contextlib.contextmanager
def scratch(parent: Path, prefix: str = "_scratch-") -> Iterator[Path]:
    """A new folder of a unique name in ``parent`` for a step's temporary files.

    Deleted with its contents when the step ends: it can only ever hold what
    curate put in it.
    """
    with tempfile.TemporaryDirectory(dir=parent, prefix=prefix) as folder:
        yield Path(folder)


@contextlib.contextmanager
def staged(target: Path) -> Iterator[Path]:
    """A new folder beside ``target`` to write it in; renamed to ``target`` when the block
    ends, deleted when the block fails, so ``target`` appears whole or not at all.

    ``target`` must not exist, or be an empty folder. The folder has a unique hidden
    name: a run killed meanwhile leaves it behind rather than have a later run delete
    a folder of that name that curate did not make.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    work.rename(target)


# --- folders shared with a base run (curate run --from) ------------------------------------

#: In a run folder: the folders it shares with base runs, as links it made, each with the
#: hash of the stage it was shared for (``links.json``).
LINKS = "links.json"


def run_folder_of(path: Path) -> Path | None:
    """The curate run folder that holds ``path`` (its nearest marked ancestor), if any."""
    for folder in [path, *path.parents]:
        if _kind_of(folder) == "run":
            return folder
    return None


def shared_links(run: Path) -> dict[str, dict]:
    """The links ``run`` made to base runs: its folder name → {"target", "base", "hash"}."""
    path = Path(run) / LINKS
    try:
        links = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise RunFolderError(
            f"{path}: unreadable ({exc}); delete the run and start it again"
        ) from exc
    fields = {"target", "base", "hash"}
    if not isinstance(links, dict) or not all(
        isinstance(name, str)
        and isinstance(link, dict)
        and fields <= link.keys()
        and all(isinstance(link[f], str) for f in fields)
        for name, link in links.items()
    ):
        raise RunFolderError(f"{path}: not what curate writes; delete the run and start it again")
    return links


def _save_links(run: Path, links: dict[str, dict]) -> None:
    tmp = run / f"{LINKS}.tmp"
    tmp.write_text(json.dumps(links, indent=1, sort_keys=True) + "\n")
    tmp.replace(run / LINKS)


def share(run: Path, name: str, target: Path, digest: str) -> None:
    """Make ``run/name`` a link to a base run's finished folder ``target``, recorded in
    ``links.json``; what ``run`` held there itself is deleted first.

    The link points at the folder that holds the files, not at another link, and the
    base it records is the run that owns that folder.
    """
    run, real = Path(run), Path(target).resolve()
    base = run_folder_of(real)
    if base is None:
        raise RunFolderError(f"{target}: not inside a curate run folder; nothing shared")
    link = run / name
    if link.is_symlink():
        unshare(run, name)
    else:
        remove_tree(link, run)
    # Recorded before it is made: a run killed in between leaves a record without a link,
    # which the next run drops (``refresh_links``), never a link nobody recorded.
    links = shared_links(run)
    links[name] = {"target": str(real), "base": str(base), "hash": digest}
    _save_links(run, links)
    link.parent.mkdir(parents=True, exist_ok=True)
    # Relative: a run and its base moved together (to a bigger disk) still share.
    link.symlink_to(os.path.relpath(real, link.parent.resolve()), target_is_directory=True)


def unshare(run: Path, name: str) -> None:
    """Remove the link ``run/name`` that ``share`` made (never what it points at)."""
    run, links = Path(run), shared_links(Path(run))
    link = run / name
    if name not in links or not link.is_symlink():
        raise RunFolderError(
            f"{link} is a symbolic link curate did not make; remove it yourself and re-run"
        )
    os.unlink(link)
    del links[name]
    _save_links(run, links)


def refresh_links(run: Path) -> None:
    """Bring ``links.json`` up to date: drop the records of links never made (a run killed
    while sharing), and name where each link leads now (the runs may have moved)."""
    run = Path(run)
    links = shared_links(run)
    fresh = {}
    for name, link in links.items():
        path = run / name
        if not path.is_symlink():
            continue
        real = path.resolve()
        base = run_folder_of(real) if real.is_dir() else None
        fresh[name] = {**link, "target": str(real), "base": str(base)} if base else link
    if fresh != links:
        _save_links(run, fresh)


def check_shared(run: Path) -> None:
    """Every folder ``run`` shares with a base run is still there; else name the base."""
    for name, link in shared_links(run).items():
        if not (Path(run) / name).is_dir():
            raise RunFolderError(
                f"{Path(run) / name} is shared with the base run {link['base']}, and "
                f"{link['target']} is gone: this run still needs it. Restore the base run, "
                "or delete this run and run its recipe again without --from"
            )


@contextlib.contextmanager
def reading(bases: list[Path]) -> Iterator[None]:
    """Hold shared locks on base runs while a run reads their folders: a base cannot be
    re-run meanwhile, and a base being written now is refused."""
    with contextlib.ExitStack() as stack:
        for base in sorted(set(bases)):
            handle = stack.enter_context(open(Path(base) / LOCK, "a+"))
            _lock(handle, fcntl.LOCK_SH, f"the base run {base}")
        yield
