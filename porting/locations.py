"""One path -> the weights it names: a run folder, its checkpoints/ folder, a step, an orbax or Hub-layout directory,
or a file. Every reader (port-weights, --init-from, train.predict, load_flax_variables, from_pretrained) starts here,
so all accept the same set and refuse the rest with the same message (`nothing_matches`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from porting import files, runs
from porting.errors import PortingError, failing_as, parse_json
from porting.hub import HUB_CONFIG, HUB_CONFIG_KEYS, HUB_WEIGHTS, hub_weights

# `<run>/best` and `<run>/latest` name a run's best (by validation macro F1) and newest checkpoint.
SELECTORS = ("best", "latest")

ACCEPTED = (
    "a training run folder (train.flax: its best step; train.torch: torch_checkpoints/best.pt), its checkpoints/ "
    "folder, a step folder checkpoints/<step>, <run>/best or <run>/latest, an orbax checkpoint directory, a Hugging "
    "Face Hub-layout directory (config.json with model.safetensors or pytorch_model.bin), or a .pt/.pth/"
    ".safetensors, .msgpack or .weights/.conv.NN file, or a Hugging Face Hub id (hf-hub:owner/name, or owner/name "
    "where no local path of that name exists), read from huggingface_hub's cache"
)
HUB_PREFIX = "hf-hub:"  # timm's spelling of an explicit Hub id
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name: a Hub id where no local path of that name exists


@dataclasses.dataclass(frozen=True)
class Location:
    """What one path names: the file or folder to read, its kind and format, and how it was found."""

    given: str  # the path as the user wrote it
    path: str  # what is read: a file, an orbax directory, a train.flax step folder, or a Hub-layout directory
    kind: str  # file, orbax, train_step or hub_dir
    format: str  # torch, safetensors, msgpack, orbax or darknet (a Hub directory: its weights file's)
    step: int | None = None  # a training run's step
    notes: tuple[str, ...] = ()  # how `given` led to `path`

    @property
    def side(self) -> str:
        """'torch', 'flax' or 'darknet': the framework whose files these are."""
        return files.FORMAT_SIDES[self.format]

    def describe(self) -> str:
        """'runs/x -> runs/x/checkpoints/33 (step 33)' for messages: what was given and what was read."""
        read = "" if os.path.abspath(self.path) == os.path.abspath(self.given) else f" -> {self.path}"
        return f"{self.given}{read}" + ("" if self.step is None else f" (step {self.step})")


def nothing_matches(given: str, why: str) -> PortingError:
    """The one error for a path that names no weights, whoever asked."""
    return PortingError(f"{given!r} {why}; expected {ACCEPTED}")


def _locate_local(given: str) -> Location:
    try:
        return _locate(given)
    except OSError as e:  # a name component over 255 bytes, a folder we may not list: an answer, not a traceback
        raise nothing_matches(given, f"cannot be looked at ({e.strerror or type(e).__name__})") from None


def locate(path: str | os.PathLike, *, revision: str | None = None, cache_dir: str | None = None) -> Location:
    """The weights `path` names (see ACCEPTED; a Hub id: its snapshot in huggingface_hub's cache, fetched if needed
    and allowed); PortingError (`nothing_matches`) when it names none."""
    name = os.fspath(path)
    if not is_hub_id(path):
        return _locate_local(name)
    bare = not name.startswith(HUB_PREFIX)
    repo_id = name if bare else name[len(HUB_PREFIX) :]
    return hub_location(repo_id, revision=revision, cache_dir=cache_dir, also_a_path=bare)


def is_hub_id(path: str | os.PathLike) -> bool:
    """Whether `locate` reads `path` from the Hub (its lookup may download), rather than as a local path."""
    name = os.fspath(path)
    return name.startswith(HUB_PREFIX) or (isinstance(path, str) and _bare_hub_id(name))


def _bare_hub_id(name: str) -> bool:
    """Whether `name` reads as a Hub id (owner/name) rather than a local path: the shape, and nothing local that it
    could be a typo of (no such path, no folder of its first part, no weights-file suffix), so a mistyped path is
    named as missing, never sent to the Hub."""
    p = Path(name)
    if not HUB_ID.fullmatch(name) or ".." in name or _exists(p) or _exists(p.parent):
        return False
    try:
        return files.format_of(name) == "orbax"  # no suffix: a folder's name, or a repository's
    except PortingError:
        return True  # a suffix no weights file has (timm's "darknet53.c2ns_in1k")


def _exists(p: Path) -> bool:
    """Whether `p` (or the run a <run>/best, <run>/latest names) is there; True when it cannot be looked at, so
    that the local reader names the problem."""
    try:
        return p.exists() or (p.name in SELECTORS and p.parent.is_dir())
    except OSError:
        return True


def hub_location(
    repo_id: str, *, revision: str | None = None, cache_dir: str | None = None, also_a_path: bool = False
) -> Location:
    """config.json and the weights of Hub repository `repo_id`, from huggingface_hub's cache (downloaded if needed
    and allowed), as the Location of their snapshot directory."""
    try:
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError, RepositoryNotFoundError
    except ImportError as exc:
        raise PortingError(
            f"reading Hub id {repo_id!r} needs huggingface_hub: pip install 'darknet53-jax[porting]'"
        ) from exc
    label = f"{HUB_PREFIX}{repo_id}"
    missing: list[Exception] = []  # the files neither the cache (Local...) nor the repository (Remote...) holds

    def download(filename: str) -> str | None:
        with failing_as(f"{label}: cannot fetch {filename}"):
            try:
                return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir)
            except (LocalEntryNotFoundError, RemoteEntryNotFoundError) as exc:
                missing.append(exc)
                return None
            except RepositoryNotFoundError:
                where = " (and no local path of that name exists)" if also_a_path else ""
                raise PortingError(
                    f"{label}: no such Hub repository{where} (or it is private or gated: log in first)"
                ) from None

    config = download(HUB_CONFIG)
    if config is None or not any(download(weights) is not None for weights in HUB_WEIGHTS):
        if any(isinstance(exc, LocalEntryNotFoundError) for exc in missing):
            either = " (no local path of that name exists either)" if also_a_path else ""
            cache = cache_dir or constants.HF_HUB_CACHE
            if constants.HF_HUB_OFFLINE:
                then = "HF_HUB_OFFLINE is set, so nothing is downloaded: unset HF_HUB_OFFLINE to download it once"
            else:
                then = "the Hub could not be reached: connect and retry (HF_HUB_OFFLINE=1 uses the cache only)"
            raise PortingError(
                f"Hub id {repo_id!r}{either} is not in the Hugging Face cache {cache}, and {then}, or pass a local "
                "directory"
            )
        wanted = HUB_CONFIG if config is None else f"weights ({' or '.join(HUB_WEIGHTS)})"
        raise PortingError(f"{label}: the repository holds no {wanted}")
    location = _locate_local(str(Path(config).parent))
    return dataclasses.replace(location, given=label, notes=(*location.notes, f"{label}: read {location.path}"))


def _locate(given: str) -> Location:
    p = Path(given)
    if p.is_file():
        try:
            return Location(given, given, "file", files.format_of(given))
        except PortingError:
            raise nothing_matches(given, "has a name whose format porting cannot tell") from None
    if p.is_dir():
        return _locate_dir(given, p, None)
    if p.name in SELECTORS and p.parent.is_dir():
        return _locate_dir(given, p.parent, p.name)
    raise nothing_matches(given, "does not exist")


def _is_hub_dir(d: Path) -> bool:
    config = d / HUB_CONFIG
    if not config.is_file():
        return False
    raw = _json_object(config)
    if raw is None:
        return hub_weights(d) is not None  # an unreadable config.json beside Hub weights: refused when read
    return any(k in raw for k in HUB_CONFIG_KEYS)


def _json_object(path: Path) -> dict | None:
    """The JSON object a config file holds; None when it is unreadable, not JSON, or not an object."""
    try:
        raw = parse_json(path.read_bytes(), str(path))
    except (OSError, PortingError):
        return None
    return raw if isinstance(raw, dict) else None


def _is_train_step(d: Path) -> bool:
    return d.name.isdigit() and (d / runs.STATE).is_dir() and (d / runs.META).is_dir()


def _locate_dir(given: str, d: Path, selector: str | None) -> Location:
    if _is_hub_dir(d) and selector is None:
        weights = hub_weights(d)
        if weights is None:
            raise PortingError(
                f"{given!r} has a Hub-layout {HUB_CONFIG} but no weights: expected {' or '.join(HUB_WEIGHTS)} beside it"
            )
        return Location(given, str(d), "hub_dir", files.format_of(weights))
    flax_run, torch_run = (d / runs.CHECKPOINT_DIR).is_dir(), (d / runs.TORCH_CHECKPOINT_DIR).is_dir()
    if flax_run and torch_run:
        raise PortingError(
            f"{given!r} holds both {runs.CHECKPOINT_DIR}/ (train.flax) and {runs.TORCH_CHECKPOINT_DIR}/ (train.torch); "
            "name one of them"
        )
    if flax_run:
        return _locate_step(given, d / runs.CHECKPOINT_DIR, selector)
    if torch_run or d.name == runs.TORCH_CHECKPOINT_DIR:
        return _locate_torch_run(given, d / runs.TORCH_CHECKPOINT_DIR if torch_run else d, selector)
    if _is_train_step(d) and selector is None:
        return Location(given, str(d), "train_step", "orbax", int(d.name))
    if any(p.is_dir() and _is_train_step(p) for p in d.iterdir()):
        return _locate_step(given, d, selector)
    if selector is not None:
        raise nothing_matches(given, f"names a {selector} checkpoint, but {str(d)!r} is not a training run")
    if (d / runs.RUN_CONFIG).is_file():
        raw = _json_object(d / runs.RUN_CONFIG)
        if raw is not None and all(k in raw for k in runs.RUN_CONFIG_KEYS):  # the fields every run records
            raise nothing_matches(given, "is a training run folder without checkpoints (none was saved yet)")
        hub = " or ".join(HUB_CONFIG_KEYS)
        raise nothing_matches(
            given, f"holds a {runs.RUN_CONFIG} that is neither a training run's nor a timm/Hub model's (one with {hub})"
        )
    if files.is_orbax_dir(d):
        return Location(given, str(d), "orbax", "orbax")
    raise nothing_matches(given, "is a folder that holds no checkpoint or weights file porting can read")


def _locate_step(given: str, checkpoints: Path, selector: str | None) -> Location:
    """The best (default) or latest step of a train.flax checkpoints/ folder, as porting.runs ranks them."""
    latest, best, scored = runs.ranked_steps(checkpoints)
    if latest is None:
        raise nothing_matches(given, f"is a training run whose {checkpoints} holds no finished checkpoint")
    step = latest if selector == "latest" else best
    which = "newest" if selector == "latest" else "best (by validation macro F1)"
    if selector != "latest" and not scored:
        which = "newest: no checkpoint has a validation score yet (the run stopped before its first evaluation)"
    path = checkpoints / str(step)
    return Location(given, str(path), "train_step", "orbax", step, (f"{given}: read step {step}, the {which}",))


def _locate_torch_run(given: str, checkpoints: Path, selector: str | None) -> Location:
    names = (runs.TORCH_LATEST,) if selector == "latest" else (runs.TORCH_BEST, runs.TORCH_LATEST)
    for name in names:
        if (checkpoints / name).is_file():
            note = f"{given}: read {checkpoints / name}"
            return Location(given, str(checkpoints / name), "file", "torch", None, (note,))
    raise nothing_matches(given, f"is a train.torch run whose {checkpoints} holds no {' or '.join(names)}")
