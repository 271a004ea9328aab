"""The genre tree and consistent scores: a hand-built tree with known answers, random scores, FMA's own rows."""

from pathlib import Path

import numpy as np
import pytest

from genreclf.errors import GenreclfError
from genreclf.hierarchy import GenreTree, convert_targets, make_consistent
from genreclf.metadata import load_fma, load_genres

DATA = Path(__file__).parent / "data"

# FMA's ids, in a column order that is not the id order: Death-Metal 101 < Metal 31 < Rock 12, Punk 25 < Rock 12,
# Jazz 4 a root of its own.
IDS = [101, 4, 31, 12, 25]
PARENTS = [31, 0, 12, 0, 12]
DEATH, JAZZ, METAL, ROCK, PUNK = range(5)


@pytest.fixture
def tree() -> GenreTree:
    return GenreTree.from_ids(IDS, PARENTS)


def test_the_tree_of_a_hand_built_vocabulary(tree):
    assert tree.parent.tolist() == [METAL, -1, ROCK, -1, ROCK]
    assert tree.depth.tolist() == [3, 1, 2, 1, 2]
    assert tree.roots.tolist() == [JAZZ, ROCK]
    assert {d: c.tolist() for d, c in tree.levels().items()} == {1: [JAZZ, ROCK], 2: [METAL, PUNK], 3: [DEATH]}


def test_fma_genres_form_16_trees_5_levels_deep():
    genres = load_genres()
    tree = GenreTree.of(genres)
    assert {d: len(c) for d, c in tree.levels().items()} == {1: 16, 2: 106, 3: 37, 4: 3, 5: 1}
    assert np.array_equal(tree.ids[tree.roots], genres.ids[genres.parents == 0])
    for c in range(len(tree)):  # the depth is the number of ancestors plus one
        assert tree.depth[c] == len(genres.ancestors(int(genres.ids[c]))) + 1


def test_consistent_scores_raise_each_genre_to_its_most_probable_descendant(tree):
    scores = np.array(
        [
            # Death-Metal, Jazz, Metal, Rock, Punk
            [0.9, 0.3, 0.6, 0.2, 0.1],  # Death-Metal lifts Metal and Rock
            [0.05, 0.7, 0.1, 0.8, 0.5],  # already consistent
            [0.2, 0.0, 0.3, 0.1, 0.4],  # Punk lifts Rock; Metal stays above Death-Metal
        ]
    )
    expected = np.array(
        [
            [0.9, 0.3, 0.9, 0.9, 0.1],
            [0.05, 0.7, 0.1, 0.8, 0.5],
            [0.2, 0.0, 0.3, 0.4, 0.4],
        ]
    )
    out = make_consistent(scores, tree)
    np.testing.assert_array_equal(out, expected)
    assert not tree.is_consistent(scores) and tree.is_consistent(out)
    np.testing.assert_array_equal(make_consistent(out, tree), out)  # idempotent
    assert scores[0, ROCK] == 0.2  # the input is left alone
    assert make_consistent(scores.astype(np.float32), tree).dtype == np.float32


def test_any_scores_come_out_consistent_raised_never_lowered_and_stable():
    tree = GenreTree.of(load_genres())
    rng = np.random.default_rng(0)
    below = []  # every genre's subtree, for the definition max over the subtree
    for c in range(len(tree)):
        below.append([d for d in range(len(tree)) if _is_under(tree, d, c)])
    for trial in range(20):
        scores = rng.random((50, len(tree))) ** rng.uniform(0.2, 5)  # from flat to heavily skewed
        if trial % 2:
            scores = np.round(scores, 1)  # ties
        out = make_consistent(scores, tree)
        assert tree.is_consistent(out)
        assert (out >= scores).all()
        np.testing.assert_array_equal(make_consistent(out, tree), out)
        expected = np.stack([scores[:, sub].max(1) for sub in below], axis=1)
        np.testing.assert_array_equal(out, expected)


def _is_under(tree: GenreTree, d: int, c: int) -> bool:
    while d >= 0:
        if d == c:
            return True
        d = tree.parent[d]
    return False


def test_a_nan_spreads_up_and_an_unscored_row_stays_unscored(tree):
    scores = np.array([[np.nan, 0.1, 0.2, 0.3, 0.4], [np.nan] * 5])
    out = make_consistent(scores, tree)
    assert np.isnan(out[0, [DEATH, METAL, ROCK]]).all() and out[0, PUNK] == 0.4 and out[0, JAZZ] == 0.1
    assert np.isnan(out[1]).all() and tree.is_consistent(out)


def test_targets_gain_ancestors_or_keep_the_most_specific(tree):
    genres = np.array([[1, 0, 0, 0, 0], [0, 1, 0, 0, 1], [0, 0, 1, 1, 0], [0, 0, 0, 0, 0]], dtype=np.uint8)
    every = tree.with_ancestors(genres)
    assert every.dtype == np.uint8
    assert every.tolist() == [[1, 0, 1, 1, 0], [0, 1, 0, 1, 1], [0, 0, 1, 1, 0], [0, 0, 0, 0, 0]]
    # Back: the third track was tagged Metal and Rock; only Metal is most specific.
    assert tree.most_specific(every).tolist() == [[1, 0, 0, 0, 0], [0, 1, 0, 0, 1], [0, 0, 1, 0, 0], [0] * 5]
    same, how = convert_targets(genres, "genres", "genres", tree)
    assert same is genres and "own" in how
    derived, how = convert_targets(genres, "genres", "genres_all", tree)
    assert np.array_equal(derived, every) and "ancestors" in how
    with pytest.raises(GenreclfError, match="unknown labels"):
        convert_targets(genres, "genres", "tags", tree)


def test_fma_genres_all_is_genres_plus_every_ancestor_on_real_rows():
    """FMA's first 682 tracks: genres_all is genres with ancestors, always; genres the most specific, 8 exceptions."""
    tags, every = load_fma(DATA / "tracks_head.csv"), load_fma(DATA / "tracks_head.csv", labels="genres_all")
    tree = GenreTree.of(tags.vocabulary)
    assert np.array_equal(tree.with_ancestors(tags.targets), every.targets)
    back = tree.most_specific(every.targets)
    differ = np.flatnonzero((back != tags.targets).any(1))
    # Exactly the tracks tagged with a genre and one of its ancestors: genres_all cannot say so.
    vocab, tagged_with_ancestor = tags.vocabulary, []
    for r in range(len(tags)):
        mine = set(vocab.ids[tags.targets[r] > 0].tolist())
        if any(set(vocab.ancestors(g)) & mine for g in mine):
            tagged_with_ancestor.append(r)
    assert differ.tolist() == tagged_with_ancestor and len(differ) == 8
    assert (back <= tags.targets).all()  # it only ever misses the ancestor tags


def test_a_broken_tree_is_refused():
    with pytest.raises(GenreclfError, match="parent 12 is not among"):
        GenreTree.from_ids([31, 4], [12, 0])
    with pytest.raises(GenreclfError, match="its own ancestor"):
        GenreTree.from_ids([1, 2, 3], [2, 3, 1])
    with pytest.raises(GenreclfError, match="parent ids for"):
        GenreTree.from_ids([1, 2], [0])
    with pytest.raises(GenreclfError, match="not \\(tracks, 5 genres\\)"):
        GenreTree.from_ids(IDS, PARENTS).with_ancestors(np.zeros((2, 4)))
