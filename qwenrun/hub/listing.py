"""What a hub repo offers: its GGUF files grouped into quants, and which quant to fetch.

Contract: `list_repo` makes one hub request (the repo's files with sizes and LFS sha256) and
groups the files into quants with `names.group_files` (split sets in shard order, `mmproj` files
apart). `plan_pull` turns a model reference into a `PullTarget` — one quant of one repo at one
commit — trying a catalog model's repos in order; which quant, when the user names none, is the
caller's `Chooser` (the planner's, `offload.planner_chooser` in `planner/reference.py`, which
reads real headers for repos outside the catalog) or, without one, `choose_quant`'s fixed rule.
It downloads no file and writes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from qwenrun import catalog, errors
from qwenrun.hub import names
from qwenrun.hub.refs import ModelRef, reference_for
from qwenrun.hub.session import api, hub_errors


@dataclass(frozen=True)
class HubFile:
    """One file of a hub repo as the hub lists it."""

    path: str
    size: int
    sha256: str | None  # the LFS hash (None for a file kept in git)
    blob_id: str | None  # the git object id

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name


@dataclass(frozen=True)
class QuantFiles:
    """The files of one quant: a single GGUF, or every shard of a split set in order."""

    quant: str
    files: tuple[HubFile, ...]

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(f.path for f in self.files)


@dataclass(frozen=True)
class RepoListing:
    """A repo at one commit: its quants (best first) and its vision projectors, kept apart."""

    repo: str
    revision: str  # the commit every file is fetched from
    quants: tuple[QuantFiles, ...]
    mmproj: tuple[HubFile, ...]

    def find(self, quant: str) -> QuantFiles | None:
        wanted = quant.lower()
        return next((q for q in self.quants if q.quant.lower() == wanted), None)

    @property
    def quant_names(self) -> tuple[str, ...]:
        return tuple(q.quant for q in self.quants)


def safe_repo_path(repo: str, path: str) -> str:
    """A repo file name that stays inside the cache folder, or DownloadError."""
    posix = path.replace("\\", "/")
    parts = posix.split("/")
    if (
        not path
        or posix.startswith("/")
        or re.match(r"^[A-Za-z]:", posix)
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise errors.DownloadError(
            f"{repo} lists a file named {path!r}, which would land outside the cache; "
            "refusing to download from this repo",
            hint="use another repo for this model; this one (or the endpoint) is not trustworthy",
        )
    return path


def list_repo(repo: str, revision: str | None = None) -> RepoListing:
    """One request for the repo's files with sizes and LFS sha256, grouped into quants."""
    with hub_errors(repo, "listing the repo's files"):
        info = api().model_info(repo, revision=revision, files_metadata=True)
    siblings = info.siblings or []
    files = {}
    for s in siblings:
        path = safe_repo_path(repo, s.rfilename)
        files[path] = HubFile(
            path=path,
            size=int(s.lfs.size if s.lfs else s.size or 0),
            sha256=s.lfs.sha256 if s.lfs else None,
            blob_id=s.blob_id,
        )
    groups, mmproj = names.group_files(files)
    quants = tuple(
        QuantFiles(quant=g.quant, files=tuple(files[p] for p in g.paths)) for g in groups
    )
    commit = info.sha or revision or "main"
    return RepoListing(repo, commit, quants, tuple(files[p] for p in mmproj))


def list_quants(repo: str, revision: str | None = None) -> list[QuantFiles]:
    """The repo's GGUF quants with their files, sizes and sha256, best quant first."""
    return list(list_repo(repo, revision).quants)


# ------------------------------------------------------------------------------ choosing


@dataclass(frozen=True)
class PullTarget:
    """What a pull will fetch: one quant of one repo at one commit."""

    repo: str
    revision: str  # commit
    branch: str | None  # the ref the user asked for ("main"), written to refs/
    quant: QuantFiles
    spec: catalog.ModelSpec | None = None
    cached: bool = False  # a complete copy of exactly this is in the cache already

    @property
    def reference(self) -> str:
        return reference_for(self.repo, self.quant.quant)

    @property
    def total_size(self) -> int:
        return self.quant.total_size


# The quants a pull picks when no quant is named and the planner cannot say (see choose_quant).
DEFAULT_QUANTS = ("UD-Q4_K_XL", "Q4_K_M")


def choose_quant(ref: ModelRef, listing: RepoListing) -> QuantFiles:
    """The quant to pull when the user names none and the caller gives no `Chooser`.

    The commands pass `offload.planner_chooser`, which plans from tensor sizes instead; this
    fixed rule needs no machine and no header: a 4-bit default when the repo has one, else
    the best quant smaller than Q4_K_M, else the smallest.
    """
    if not listing.quants:
        raise errors.ModelNotFoundError(f"{listing.repo} holds no GGUF files")
    for name in DEFAULT_QUANTS:
        found = listing.find(name)
        if found is not None:
            return found
    q4 = catalog.quant_rank("Q4_K_M")
    smaller = [q for q in listing.quants if catalog.quant_rank(q.quant) > q4]
    if smaller:
        return min(smaller, key=lambda q: catalog.quant_rank(q.quant))
    return min(listing.quants, key=lambda q: q.total_size)


Chooser = Callable[[ModelRef, RepoListing], QuantFiles]


def plan_pull(
    ref: ModelRef, quant: str | None = None, *, choose: Chooser | None = None
) -> PullTarget:
    """Find the quant to fetch: `quant` (or the ref's), else `choose`'s pick, in the ref's repos.

    A catalog model may live in several repos: the first that has the quant wins.
    """
    wanted = catalog.normalize_quant(quant) if quant else ref.quant
    listings: list[RepoListing] = []
    unusable: list[errors.QwenrunError] = []
    for repo in ref.repos:
        try:
            listing = list_repo(repo)
        except (errors.ModelNotFoundError, errors.AuthError) as err:
            # A catalog repo gone or made private (the hub answers 401 for both): try the
            # next one; with nothing usable, the first repo's error is the one to show.
            unusable.append(err)
            continue
        listings.append(listing)
        found = listing.find(wanted) if wanted else (choose or choose_quant)(ref, listing)
        if found is not None:
            return PullTarget(repo, listing.revision, "main", found, ref.spec)
    if not listings:
        raise unusable[0]
    raise no_such_quant(ref.name, wanted, listings)


def no_such_quant(
    name: str, wanted: str | None, listings: Sequence[RepoListing]
) -> errors.ModelNotFoundError:
    """`name` (a model or repo) has no quant `wanted`: the close ones and all on offer."""
    import difflib

    have = sorted({q for lst in listings for q in lst.quant_names}, key=catalog.quant_rank)
    close = difflib.get_close_matches(wanted or "", have, n=3, cutoff=0.5)
    message = f"{name} has no quant {wanted}"
    if close:
        message += f"; did you mean {', '.join(close)}?"
    return errors.ModelNotFoundError(
        message, hint=f"available: {', '.join(have)}" if have else "the repo has no GGUF files"
    )
