"""FMA's genre tree and scores that respect it.

genres.csv gives every genre a parent (0 for the 16 top-level genres), so the 163 genres form
16 trees, 5 levels deep: level 1 holds the 16 roots (Rock), level 2 their children (Metal), and so
on. FMA's `genres_all` column is a track's `genres` plus all their ancestors
(`GenreTree.with_ancestors`, checked on FMA's own rows by the tests).

Consistent scores (`make_consistent`, the rule `CONSISTENCY_RULE`): a genre's score becomes the
largest score in its subtree, itself included, so that a parent scores at least as high as its most
probable descendant and no genre ever scores above its parent. Of the two ways to enforce that
invariant this is the one that matches FMA's labels: a track tagged Metal is Rock too (genres_all),
so a confident Metal is evidence for Rock, and applied to 0/1 `genres` targets the rule gives
exactly `genres_all`. The other way, clipping each child down to its parent, would throw that
evidence away, and hurts most where models are weakest: a model trained on `genres` rarely sees a
Metal track tagged Rock, so it scores Rock low on them, and clipping would drag Metal down with it.
The rule only raises scores; a genre's own score is kept whenever it already tops its subtree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from genreclf.errors import GenreclfError

if TYPE_CHECKING:  # genreclf.metadata imports pandas, which the prediction path must not pay for
    from genreclf.metadata import Genres

CONSISTENCY_RULE = (
    "max over descendants: each genre's score is raised to the largest score in its subtree "
    "(its own, its children's, their children's, ...), so a parent scores at least its most probable "
    "descendant and no genre scores above its parent; applied to 0/1 genres targets it gives genres_all"
)

# How evaluation targets of one label set are made from a store holding the other.
DERIVED_TARGETS = {
    ("genres", "genres_all"): (
        "derived from the store's genres: each track's genres and all their ancestors, FMA's own definition "
        "of genres_all (exact: it reproduces tracks.csv's genres_all column)"
    ),
    ("genres_all", "genres"): (
        "derived from the store's genres_all: each track's most specific genres (those without a descendant "
        "among its genres_all); FMA's genres column also lists an ancestor when the track was tagged with it, "
        "so this misses those tags (8 of FMA's first 682 tracks, e.g. one tagged both Rock and Metal)"
    ),
}


@dataclass(frozen=True, eq=False)
class GenreTree:
    """The parent of each genre as a column index, in the column order of scores and targets."""

    ids: np.ndarray  # int64 (genres,) genre ids: the column order
    parent: np.ndarray  # int64 (genres,) column of each genre's parent, -1 for a root (top-level genre)
    depth: np.ndarray  # int64 (genres,) level in the tree: 1 for a root, 2 for its children, ...
    _deepest_first: np.ndarray = field(repr=False)  # columns by depth, deepest first: children before parents

    @classmethod
    def from_ids(cls, genre_ids: np.ndarray | list[int], parent_ids: np.ndarray | list[int]) -> GenreTree:
        """Return the tree of genres given by id with their parents' ids (0 for a root); GenreclfError if broken."""
        ids = np.asarray(genre_ids, dtype=np.int64)
        parents = np.asarray(parent_ids, dtype=np.int64)
        if ids.ndim != 1 or parents.shape != ids.shape:
            raise GenreclfError(f"{len(parents)} parent ids for {len(ids)} genres; the genre tree is damaged")
        column = {int(g): c for c, g in enumerate(ids)}
        if len(column) != len(ids):
            raise GenreclfError("a genre id appears twice in the genre list; the genre tree is damaged")
        unknown = [(int(g), int(p)) for g, p in zip(ids, parents) if p != 0 and int(p) not in column]
        if unknown:
            g, p = unknown[0]
            raise GenreclfError(f"genre {g}'s parent {p} is not among the genres; use FMA's complete genres.csv")
        parent = np.array([column[int(p)] if p != 0 else -1 for p in parents], dtype=np.int64)
        depth = np.zeros(len(ids), dtype=np.int64)
        for c in range(len(ids)):
            path, node = [], c
            while node >= 0 and depth[node] == 0:
                if len(path) > len(ids):
                    raise GenreclfError(f"genre {int(ids[c])} is its own ancestor; the genre tree is damaged")
                path.append(node)
                node = parent[node]
            known = depth[node] if node >= 0 else 0
            for k, n in enumerate(reversed(path)):
                depth[n] = known + k + 1
        order = np.argsort(-depth, kind="stable")
        return cls(ids, parent, depth, order)

    @classmethod
    def of(cls, genres: Genres) -> GenreTree:
        """Return the tree of a genres.csv vocabulary (genreclf.metadata.load_genres)."""
        return cls.from_ids(genres.ids, genres.parents)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def roots(self) -> np.ndarray:
        """Return the columns of the top-level genres (16 for FMA)."""
        return np.flatnonzero(self.parent < 0)

    def levels(self) -> dict[int, np.ndarray]:
        """Return the columns of each level, {1: the roots, 2: their children, ...}."""
        return {int(d): np.flatnonzero(self.depth == d) for d in np.unique(self.depth)}

    def _check(self, array: np.ndarray) -> np.ndarray:
        array = np.asarray(array)
        if array.ndim != 2 or array.shape[1] != len(self):
            raise GenreclfError(f"an array of shape {array.shape} is not (tracks, {len(self)} genres)")
        return array

    def with_ancestors(self, targets: np.ndarray) -> np.ndarray:
        """Return 0/1 targets (tracks, genres) with every ancestor of each positive genre set: genres -> genres_all."""
        return make_consistent(self._check(targets), self).astype(np.asarray(targets).dtype)

    def most_specific(self, targets: np.ndarray) -> np.ndarray:
        """Return 0/1 targets keeping only the genres without a positive descendant: genres_all -> (about) genres."""
        targets = self._check(targets)
        below = np.zeros(targets.shape, dtype=bool)  # some descendant is positive
        for c in self._deepest_first:
            p = self.parent[c]
            if p >= 0:
                below[:, p] |= below[:, c] | (targets[:, c] > 0)
        return np.where(below, 0, targets).astype(targets.dtype)

    def is_consistent(self, scores: np.ndarray) -> bool:
        """Return True if no genre scores above its parent in any row (NaN rows count as consistent)."""
        scores = self._check(scores)
        child = np.flatnonzero(self.parent >= 0)
        with np.errstate(invalid="ignore"):
            return not (scores[:, child] > scores[:, self.parent[child]]).any()


def level_name(depth: int | None, short: bool = False) -> str:
    """Return how a level is named: "all genres" (depth None), "level 1 (top-level)", "level 2", ...

    short: "all", "top-level", "level 2", ...
    """
    if depth is None:
        return "all" if short else "all genres"
    if depth == 1:
        return "top-level" if short else "level 1 (top-level)"
    return f"level {depth}"


def make_consistent(scores: np.ndarray, tree: GenreTree) -> np.ndarray:
    """Return scores (tracks, genres) in which each genre is raised to the largest score in its subtree.

    CONSISTENCY_RULE: afterwards no genre scores above its parent, and applying it again changes
    nothing. A NaN (an unscored track) spreads to the ancestors of its genre.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[1] != len(tree):
        raise GenreclfError(f"scores of shape {scores.shape} for a genre tree of {len(tree)} genres")
    out = np.array(scores, copy=True)
    for c in tree._deepest_first:  # children before parents: a parent sees its finished subtree
        p = tree.parent[c]
        if p >= 0:
            np.maximum(out[:, p], out[:, c], out=out[:, p])
    return out


def convert_targets(targets: np.ndarray, have: str, want: str, tree: GenreTree) -> tuple[np.ndarray, str]:
    """Return the `want` targets ("genres" or "genres_all") made from a store's `have` targets, and how."""
    from genreclf.metadata import LABEL_COLUMNS

    for name in (have, want):
        if name not in LABEL_COLUMNS:
            raise GenreclfError(f"unknown labels {name!r}: use one of {', '.join(LABEL_COLUMNS)}")
    if have == want:
        return np.asarray(targets), f"the store's own {have} column"
    convert = tree.with_ancestors if want == "genres_all" else tree.most_specific
    return convert(targets), DERIVED_TARGETS[(have, want)]
