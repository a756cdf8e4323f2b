"""
Writing files so that nothing outside what the user named is ever written, replaced or
lost: every file the tool writes (videos, masks, JSON stats, reports, plots, converted
checkpoints) goes to a temporary file of its own beside the target and is renamed
into place only when complete, only if the target does not exist (or, with
--overwrite, is a regular file), so two runs on one output never swap contents and an
interrupted or killed run never leaves a half-written file under a final name.

A temporary file is named `.<target name>.<pid>.<random>.partial`: a run killed with
SIGKILL leaves one behind, and the next run that writes the same target removes the
ones whose process is gone.
"""

import errno
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path


class OutputError(Exception):
    """An output cannot be written where it was asked to be; the message says why and what to do."""


def target_problem(path, overwrite):
    """Why `path` cannot be written (a sentence), or None: an existing target needs
    --overwrite and must be a regular file; its folder must be a folder."""
    path = Path(path)
    try:
        info = path.lstat()
    except FileNotFoundError:
        info = None
    except NotADirectoryError:
        blocking = next(parent for parent in reversed(path.parents) if parent.exists() and not parent.is_dir())
        return f"cannot create the output folder {blocking}: a file of that name is in the way; choose another output"
    except OSError as err:
        return f"cannot look at {path} ({err.strerror}); choose another output"
    if info is not None:
        if not stat.S_ISREG(info.st_mode):
            kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a link" if stat.S_ISLNK(info.st_mode) else \
                "a device or pipe, not a file"
            return f"{path} is {kind}; give the output a file name of its own"
        if not overwrite:
            return f"{path} already exists; pass --overwrite or choose another output"
    return None


def folder_problem(folder):
    """Why `folder` cannot be an output folder (a sentence), or None: the nearest part of
    it that exists must be a folder this process may write into. Makes nothing."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder; choose another output folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot write into the folder {existing} (permission denied); choose another output folder"
    return None


def prepare_folder(path):
    """Make the target's folder and check that a file can be created there, before any work."""
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create the output folder {folder} ({err.strerror or err}); choose another "
                          "output") from None
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{Path(path).name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(f"cannot write into the folder {folder} ({err.strerror or err}); choose another "
                          "output") from None


def remove_stale_partials(target):
    """Remove the temporary files of `target` left by runs that no longer exist."""
    target = Path(target)
    for partial in target.parent.glob(f".{target.name}.*.partial"):
        pid = partial.name[len(target.name) + 2:].split(".")[0]
        if pid.isdigit() and not process_alive(int(pid)):
            partial.unlink(missing_ok=True)


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def partial_path(target):
    """A new, unique temporary file beside `target` (created empty)."""
    target = Path(target)
    remove_stale_partials(target)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.{os.getpid()}.", suffix=".partial")
    os.close(fd)
    return Path(name)


def publish(partial, target, overwrite):
    """Move the complete file `partial` to `target`: without overwrite only if nothing is
    there (a hard link, which fails if it exists: no race with another run); with it
    only over a regular file. The partial is gone afterwards, whatever happens."""
    partial, target = Path(partial), Path(target)
    appeared = OutputError(f"{target} appeared while this run was writing it (another run?); this run's result "
                           "was not kept: pass --overwrite or choose another output")
    try:
        if problem := target_problem(target, overwrite):
            raise appeared if "already exists" in problem else OutputError(problem)
        if overwrite:
            os.replace(partial, target)
            return
        try:
            os.link(partial, target)
        except FileExistsError:
            raise appeared from None
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            os.replace(partial, target)  # a file system without hard links: checked just above
    except OSError as err:
        raise OutputError(f"cannot write {target} ({err.strerror or err}); check the folder is writable and has "
                          "free space") from None
    finally:
        partial.unlink(missing_ok=True)


@contextmanager
def writing(target, overwrite=False):
    """with writing(path) as partial: write the whole file to `partial`; it becomes
    `target` when the block ends without an error, and is removed otherwise."""
    partial = partial_path(target)
    try:
        yield partial
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    publish(partial, target, overwrite)


def write_text(target, text, overwrite=False):
    with writing(target, overwrite) as partial:
        try:
            partial.write_text(text)
        except OSError as err:  # a full disk, a file-size limit: one sentence, the partial file removed
            raise OutputError(f"could not write {target}: {err.strerror or err}; free some space or choose another "
                              "path") from None


def file_keys(path):
    """What names a file: its resolved path and, if it exists, its (device, inode). Two
    paths name one file when their keys meet (a set of many paths' keys is one lookup)."""
    path = Path(path)
    keys = {path.resolve()}
    try:
        stat = path.stat()
        keys.add((stat.st_dev, stat.st_ino))
    except OSError:
        pass
    return keys


def same_file(a, b):
    """Whether two paths name one file: the same path, or a link (hard or symbolic) to it."""
    return bool(file_keys(a) & file_keys(b))
