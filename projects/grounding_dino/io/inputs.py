"""Listing inputs: folders, globs and list files -> image (and video) paths, their names under a
root folder, and the files their drawings go to."""

import glob
import os
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = [
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "expand_inputs",
    "input_root",
    "relative_name",
    "is_video",
    "plan_outputs",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
LIST_EXTENSIONS = (".txt", ".lst")


def _folder_files(folder: str, extensions: Tuple[str, ...], recursive: bool) -> List[str]:
    if not recursive:
        names = sorted(os.listdir(folder))
        return [
            os.path.join(folder, n)
            for n in names
            if n.lower().endswith(extensions) and os.path.isfile(os.path.join(folder, n))
        ]
    found = []
    for parent, dirs, names in os.walk(folder):
        dirs.sort()
        found.extend(
            os.path.join(parent, n) for n in sorted(names) if n.lower().endswith(extensions)
        )
    return found


def _list_file(path: str) -> Tuple[List[str], List[str]]:
    """Paths listed one a line (blank lines and ``#`` comments skipped), relative to the file."""
    base = os.path.dirname(os.path.abspath(path))
    paths, errors = [], []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            listed = os.path.join(base, os.path.expanduser(line))
            if os.path.isfile(listed):
                paths.append(listed)
            else:
                errors.append(f"{path}:{number}: {line}: no such file")
    return paths, errors


def expand_inputs(
    patterns: Sequence[str],
    *,
    extensions: Tuple[str, ...] = IMAGE_EXTENSIONS,
    recursive: bool = False,
    list_files: bool = False,
) -> Tuple[List[str], List[str]]:
    """
    Files, globs, folders (and list files) -> (paths, errors).

    Args:
        patterns: what the user gave: image files, folders, globs (``**`` goes into
            subfolders when ``recursive``), and with ``list_files`` ``.txt``/``.lst`` files
            that name one image a line (relative to the list file's folder, or absolute).
        extensions: the file endings a folder contributes (lowercase, with the dot).
        recursive: folders give the files of their subfolders too.
        list_files: read ``.txt``/``.lst`` inputs as lists of paths.

    Returns:
        the paths in the order given (a folder's sorted), without repeats, and one message
        per pattern that matched nothing or listed a missing file.
    """
    paths, errors, seen = [], [], set()
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = _folder_files(pattern, extensions, recursive)
            if not found:
                kinds = "/".join(e.lstrip(".") for e in extensions[:4])
                errors.append(f"{pattern}: folder has no {kinds}... files")
        elif os.path.isfile(pattern) and list_files and pattern.lower().endswith(LIST_EXTENSIONS):
            found, missing = _list_file(pattern)
            errors.extend(missing)
            if not found and not missing:
                errors.append(f"{pattern}: the list file names no images")
        elif os.path.isfile(pattern):
            found = [pattern]
        else:
            found = sorted(glob.glob(os.path.expanduser(pattern), recursive=recursive))
            found = [p for p in found if os.path.isfile(p)]
            if not found:
                errors.append(f"{pattern}: no such file, folder or matching glob")
        for path in found:
            key = os.path.abspath(path)
            if key not in seen:
                seen.add(key)
                paths.append(path)
    return paths, errors


def _glob_folder(pattern: str) -> str:
    """The folder part of a glob before its first wildcard (``photos`` for ``photos/*/*.jpg``)."""
    parts = os.path.expanduser(pattern).split(os.sep)
    fixed = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return os.path.abspath(os.sep.join(fixed) or ".")


def input_root(patterns: Sequence[str], paths: Sequence[str]) -> str:
    """
    The folder that output names are relative to: the deepest folder holding every input
    folder, the fixed folder of every glob and every file's parent folder (``photos/`` for
    ``--input photos/`` or ``"photos/**/*.jpg"``, ``data/`` for ``data/a/x.jpg data/b/x.jpg``).
    Absolute.
    """
    folders = [os.path.abspath(p) for p in patterns if os.path.isdir(p)]
    folders += [_glob_folder(p) for p in patterns if not os.path.exists(p) and glob.has_magic(p)]
    folders += [os.path.dirname(os.path.abspath(p)) for p in paths]
    if not folders:
        raise ValueError("no inputs to take a root folder from")
    return os.path.commonpath(folders)


def relative_name(path: str, root: str) -> str:
    """``path`` relative to ``root`` with ``/`` separators; an error when it is outside."""
    relative = os.path.relpath(os.path.abspath(path), root)
    if relative == os.pardir or relative.startswith(os.pardir + os.sep) or os.path.isabs(relative):
        raise ValueError(f"{path} is not inside the image root {root}")
    return relative.replace(os.sep, "/")


def is_video(path: str) -> bool:
    return path.lower().endswith(VIDEO_EXTENSIONS)


def plan_outputs(
    output: Optional[str], patterns: Sequence[str], paths: Sequence[str]
) -> Dict[str, str]:
    """
    Where each input's drawing goes: a file ``--output`` for a single image or video,
    else ``--output/<the input's path under the inputs' folder>`` (videos as ``.mp4`` unless
    they have a video ending), so same-named files of different folders stay apart.

    Raises:
        ValueError: a drawing would be written over an input file (``--output`` inside the
            input tree), or two inputs would be drawn to the same file.
    """
    if not output or not paths:
        return {}
    single = len(paths) == 1 and not os.path.isdir(output)
    if single and output.lower().endswith(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS):
        targets = {paths[0]: output}
    else:
        root = input_root(patterns, paths)
        targets = {}
        for path in paths:
            target = os.path.join(output, relative_name(path, root))
            if is_video(path) and not is_video(target):
                target = os.path.splitext(target)[0] + ".mp4"
            targets[path] = target
    inputs = {os.path.realpath(p): p for p in paths}
    drawn_by = {}
    for path, target in targets.items():
        real = os.path.realpath(target)
        if real in inputs:
            raise ValueError(
                f"--output {output}: drawing {path} to {target} would overwrite the input "
                f"{inputs[real]}; choose an --output folder outside the inputs"
            )
        if real in drawn_by:
            raise ValueError(f"--output {output}: {drawn_by[real]} and {path} both go to {target}")
        drawn_by[real] = path
    return targets
