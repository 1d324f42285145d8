"""Curation: exact and near (MinHash + LSH) duplicate removal on small hand-made documents (CPU, offline)."""

from __future__ import annotations

import numpy as np
import pytest

from moxin.curate.dedup import (
    NearDedupConfig,
    UnionFind,
    candidate_pairs,
    clusters_of,
    exact_duplicates,
    near_duplicates,
    shingle_hashes,
    shingles,
    signatures,
)

CHAR13 = NearDedupConfig(workers=1)  # the defaults: character 13-grams, 16 bands x 8 rows, exact verification

LIGHTHOUSE = (
    "The lighthouse on the northern headland was built in 1858, after a winter in which three ships "
    "were lost on the reef within sight of the harbour. Its tower is forty metres tall and made of "
    "granite blocks cut in a quarry on the far side of the bay and carried across by barge during the "
    "calm summer months. For more than a century the light was kept by families who lived in the low "
    "cottages at the foot of the tower. The keeper climbed the spiral stair at dusk to light the lamp, "
    "wound the clockwork that turned the great lens, and wrote the state of the weather in a log every "
    "four hours through the night. In fog he sounded the horn, sometimes for two or three days without "
    "rest, and his children learned to sleep through the noise. Supplies came by boat once a fortnight, "
    "and in a bad winter the family could be cut off for a month or more, living on salted fish, "
    "potatoes from the garden and whatever the boatmen had managed to leave on their last visit. "
    "The lamp was converted to electricity in 1964 and the light was automated in 1991, when the last "
    "keeper retired and moved to a house in the village. The cottages stood empty for some years until "
    "a local trust bought them, repaired the roofs and opened a small museum. Visitors can now climb "
    "the tower on summer afternoons, see the original lens, read pages from the old logbooks and look "
    "out over the reef that made the light necessary. On clear days the coast of the neighbouring "
    "island is visible to the north, and seals are often seen on the rocks below the tower. The trust "
    "also runs guided walks along the cliff path, which pass the ruins of a chapel and the site of a "
    "wartime signal station, and it publishes a short history of the headland written by the daughter "
    "of the last keeper, who grew up in the middle cottage and still remembers the sound of the horn."
)

BEES = (
    "Honey bees live in colonies of up to sixty thousand workers, a few hundred drones and a single "
    "queen. The workers are all female and change their jobs as they age: the youngest clean cells and "
    "feed larvae, older bees build comb and guard the entrance, and the oldest fly out to gather nectar "
    "and pollen. A forager can visit several hundred flowers on one trip and tells her sisters where to "
    "find food by dancing on the comb, the angle of the dance pointing the way relative to the sun. "
    "In autumn the colony stops raising drones, and the workers cluster around the queen through the "
    "winter, shivering their flight muscles to keep the centre of the cluster warm."
)

OPENING_HOURS = (
    "The lighthouse museum is open from April to October, Tuesday to Sunday, between ten in the "
    "morning and five in the afternoon. Tickets can be bought at the door; children under twelve go "
    "free. The tower is closed in high winds, and dogs are welcome in the garden but not in the tower."
)

TIDE_NOTICE = (
    "The causeway to the island floods twice a day. Check the tide tables posted at the car park "
    "before you cross, allow at least two hours for the return walk and never try to wade across "
    "once the water has reached the marker posts."
)

LICENCE = (
    "Copyright (c) 2024 The Coastal Heritage Archive. This text is licensed under the Creative "
    "Commons Attribution-ShareAlike 4.0 International licence. You may copy and adapt it provided "
    "that you credit the archive."
)
FOOTER = (
    "Published by the Coastal Heritage Archive. Corrections and comments are welcome: please write "
    "to the editors at the address on our website. All photographs remain the property of their owners."
)


def edit(text: str, changes: dict[str, str]) -> str:
    """Replace each phrase, which must occur exactly once."""
    for old, new in changes.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


def jaccard(a: str, b: str, cfg: NearDedupConfig = CHAR13) -> float:
    x, y = shingles(a, cfg), shingles(b, cfg)
    return len(x & y) / len(x | y)


LIGHTHOUSE_TYPOS = edit(LIGHTHOUSE, {"in 1858": "in 1859", "three ships": "four ships",
                                     "granite blocks": "sandstone blocks", "two or three days": "several days"})
FIRST_EDITS = {"northern headland": "eastern headland", "forty metres": "thirty metres",
               "spiral stair": "narrow stair", "salted fish": "dried fish", "in 1964": "in 1967",
               "small museum": "little museum", "neighbouring island": "nearby island", "guided walks": "weekly walks"}
SECOND_EDITS = {"the reef within": "the rocks within", "once a fortnight": "once a week",
                "the last keeper retired": "the final keeper retired", "seals are often": "seals are sometimes",
                "ruins of a chapel": "ruins of a church", "wartime signal": "wartime radar",
                "short history": "brief history", "middle cottage": "end cottage"}
LIGHTHOUSE_V2 = edit(LIGHTHOUSE, FIRST_EDITS)
LIGHTHOUSE_V3 = edit(LIGHTHOUSE_V2, SECOND_EDITS)
# 13 phrases changed: similar, but just under the 0.8 threshold.
LIGHTHOUSE_REWRITE = edit(LIGHTHOUSE_V2, dict(list(SECOND_EDITS.items())[:5]))


# --- exact duplicates ---


def test_exact_duplicates_keep_the_first():
    texts = ["alpha", "beta", "alpha", "gamma", "beta", "alpha"]
    assert exact_duplicates(texts) == {2: 0, 4: 1, 5: 0}


def test_exact_duplicates_compare_the_exact_text():
    texts = [LIGHTHOUSE, LIGHTHOUSE + " ", LIGHTHOUSE.lower(), BEES, LIGHTHOUSE]
    assert exact_duplicates(texts) == {4: 0}
    assert exact_duplicates([]) == {} and exact_duplicates([BEES, LIGHTHOUSE]) == {}


# --- shingles and their hashes ---


def test_char_shingles():
    cfg = NearDedupConfig(ngram=3, unit="char")
    assert shingles("Abc, D!", cfg) == {b"abc", b"bc ", b"c d"}  # normalised first: "abc d"
    assert shingles("été", NearDedupConfig(ngram=2)) == {"ét".encode(), "té".encode()}
    assert len(shingles(LIGHTHOUSE, CHAR13)) <= len(LIGHTHOUSE) - 12


def test_word_shingles():
    cfg = NearDedupConfig(ngram=2, unit="word")
    assert shingles("The cat sat; the CAT sat.", cfg) == {b"the cat", b"cat sat", b"sat the"}


def test_a_text_shorter_than_the_ngram_is_one_shingle():
    assert shingles("Hi, there!", CHAR13) == {b"hi there"}
    assert shingles("exactly13char", CHAR13) == {b"exactly13char"}
    assert shingles("The cat sat.", NearDedupConfig(ngram=5, unit="word")) == {b"the cat sat"}
    assert len(shingle_hashes("Hi, there!", CHAR13)) == 1
    assert len(shingle_hashes("The cat sat.", NearDedupConfig(ngram=5, unit="word"))) == 1


@pytest.mark.parametrize("cfg", [
    NearDedupConfig(), NearDedupConfig(ngram=5), NearDedupConfig(ngram=3, unit="word"),
    NearDedupConfig(ngram=13, unit="word"),
], ids=["char13", "char5", "word3", "word13"])
def test_shingle_hashes_are_one_distinct_hash_per_shingle(cfg):
    for text in (LIGHTHOUSE, BEES, OPENING_HOURS, LICENCE + "\n\n" + TIDE_NOTICE):
        hashes = shingle_hashes(text, cfg)
        assert len(hashes) == len(shingles(text, cfg)) > 1
        assert len(np.unique(hashes)) == len(hashes)
        assert hashes.max() < 2**32  # 32-bit values, as the MinHash permutations expect
        np.testing.assert_array_equal(hashes, shingle_hashes(text, cfg))  # deterministic


@pytest.mark.parametrize("cfg", [NearDedupConfig(), NearDedupConfig(ngram=3, unit="word")], ids=["char", "word"])
def test_shingle_hashes_measure_the_same_overlap_as_shingles(cfg):
    for a, b in ((LIGHTHOUSE, LIGHTHOUSE_TYPOS), (LIGHTHOUSE, LIGHTHOUSE_V3), (LIGHTHOUSE, BEES)):
        ha, hb = shingle_hashes(a, cfg), shingle_hashes(b, cfg)
        shared = len(np.intersect1d(ha, hb))
        assert shared == len(shingles(a, cfg) & shingles(b, cfg))
    assert not np.array_equal(shingle_hashes(LIGHTHOUSE, cfg), shingle_hashes(LIGHTHOUSE_TYPOS, cfg))
    assert len(np.intersect1d(shingle_hashes(LIGHTHOUSE, cfg), shingle_hashes(BEES, cfg))) <= 2


def test_shingle_hashes_see_the_normalised_text():
    np.testing.assert_array_equal(shingle_hashes("The Cat -- sat, on the MAT!", CHAR13),
                                  shingle_hashes("the cat sat on the mat", CHAR13))


# --- signatures ---


def test_signatures_shape_and_identical_rows_for_identical_texts():
    cfg = NearDedupConfig(num_perm=64, bands=8, rows=8, workers=1)
    texts = [LIGHTHOUSE, BEES, LIGHTHOUSE, LIGHTHOUSE.upper().replace(".", "!"), OPENING_HOURS]
    sigs = signatures(texts, cfg)
    assert sigs.shape == (5, 64)
    np.testing.assert_array_equal(sigs[0], sigs[2])
    np.testing.assert_array_equal(sigs[0], sigs[3])  # the same text after dedup normalisation
    assert np.mean(sigs[0] == sigs[1]) < 0.1 and np.mean(sigs[1] == sigs[4]) < 0.1
    assert signatures([], cfg).shape == (0, 64)


def test_signature_agreement_estimates_the_jaccard_similarity():
    texts = [LIGHTHOUSE, LIGHTHOUSE_TYPOS, LIGHTHOUSE_V3]
    sigs = signatures(texts, CHAR13)
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert abs(np.mean(sigs[i] == sigs[j]) - jaccard(texts[i], texts[j])) < 0.12


def test_signatures_are_the_same_with_one_or_two_workers():
    texts = [LIGHTHOUSE, BEES, OPENING_HOURS, LIGHTHOUSE_TYPOS, TIDE_NOTICE, LICENCE, FOOTER]
    serial = signatures(texts, NearDedupConfig(workers=1, chunk_size=2))
    seen = []
    parallel = signatures(texts, NearDedupConfig(workers=2, chunk_size=2), progress=seen.append)
    assert seen == [2, 2, 2, 1]  # four chunks of at most two documents, computed in worker processes
    np.testing.assert_array_equal(serial, parallel)
    np.testing.assert_array_equal(serial, signatures(texts, NearDedupConfig(workers=1)))  # chunking is invisible


# --- near duplicates ---


def test_a_near_copy_is_removed_and_the_earlier_document_kept():
    assert jaccard(LIGHTHOUSE, LIGHTHOUSE_TYPOS) > 0.9
    removed, clusters = near_duplicates([BEES, LIGHTHOUSE, OPENING_HOURS, LIGHTHOUSE_TYPOS], CHAR13)
    assert removed == {3: 1} and clusters == [[1, 3]]
    # Whichever comes first is the one kept.
    removed, clusters = near_duplicates([LIGHTHOUSE_TYPOS, BEES, LIGHTHOUSE], CHAR13)
    assert removed == {2: 0} and clusters == [[0, 2]]


def test_exact_copies_and_reformatted_copies_are_near_duplicates():
    texts = [OPENING_HOURS, BEES, OPENING_HOURS, OPENING_HOURS.upper().replace(",", "").replace(".", " .")]
    assert near_duplicates(texts, CHAR13) == ({2: 0, 3: 0}, [[0, 2, 3]])


def test_shared_boilerplate_does_not_make_a_duplicate():
    notice = LICENCE + "\n\n" + OPENING_HOURS + "\n\n" + FOOTER
    other = LICENCE + "\n\n" + TIDE_NOTICE + "\n\n" + FOOTER
    assert len(LICENCE) >= 200 and len(FOOTER) >= 180
    assert 0.2 < jaccard(notice, other) < 0.6  # a real overlap, but well below the threshold
    for cfg in (CHAR13, NearDedupConfig(workers=1, bands=32, rows=4)):
        assert near_duplicates([notice, other, BEES], cfg) == ({}, [])


def test_a_chain_of_near_copies_keeps_only_the_earliest():
    # v2 is close to both the original and v3, which are not close to each other: one cluster all the same.
    assert jaccard(LIGHTHOUSE, LIGHTHOUSE_V2) > 0.85 and jaccard(LIGHTHOUSE_V2, LIGHTHOUSE_V3) > 0.85
    assert jaccard(LIGHTHOUSE, LIGHTHOUSE_V3) < 0.75
    texts = [BEES, LIGHTHOUSE_V2, LIGHTHOUSE, OPENING_HOURS, LIGHTHOUSE_V3]
    removed, clusters = near_duplicates(texts, CHAR13)
    assert clusters == [[1, 2, 4]]
    assert removed == {2: 1, 4: 1}
    kept = [i for i in range(len(texts)) if i not in removed]
    assert kept == [0, 1, 3]


def test_verify_modes_on_a_pair_just_under_the_threshold():
    similarity = jaccard(LIGHTHOUSE, LIGHTHOUSE_REWRITE)
    assert 0.75 < similarity < 0.8
    texts = [LIGHTHOUSE, BEES, LIGHTHOUSE_REWRITE]
    low_rows = {"bands": 32, "rows": 4, "workers": 1}  # proposes pairs well below 0.8
    sigs = signatures(texts, NearDedupConfig(**low_rows))
    assert candidate_pairs(sigs, NearDedupConfig(**low_rows)) == [(0, 2)]  # LSH does propose it

    assert near_duplicates(texts, NearDedupConfig(verify="none", **low_rows)) == ({2: 0}, [[0, 2]])
    assert near_duplicates(texts, NearDedupConfig(verify="exact", **low_rows)) == ({}, [])
    estimate = np.mean(sigs[0] == sigs[2])
    expected = ({2: 0}, [[0, 2]]) if estimate >= 0.8 else ({}, [])
    assert near_duplicates(texts, NearDedupConfig(verify="minhash", **low_rows)) == expected
    # Just above the threshold, exact verification merges.
    assert jaccard(LIGHTHOUSE, LIGHTHOUSE_V2) >= 0.8
    assert near_duplicates([LIGHTHOUSE, BEES, LIGHTHOUSE_V2], NearDedupConfig(verify="exact", **low_rows)) == (
        {2: 0}, [[0, 2]])


def test_minhash_verification_merges_a_clear_near_copy():
    cfg = NearDedupConfig(verify="minhash", workers=1)
    assert near_duplicates([LIGHTHOUSE, BEES, LIGHTHOUSE_TYPOS], cfg) == ({2: 0}, [[0, 2]])


def test_word_ngrams():
    cfg = NearDedupConfig(unit="word", ngram=5, workers=1)
    assert jaccard(LIGHTHOUSE, LIGHTHOUSE_TYPOS, cfg) > 0.8
    assert near_duplicates([LIGHTHOUSE, BEES, LIGHTHOUSE_TYPOS], cfg) == ({2: 0}, [[0, 2]])


def test_no_documents_or_one_document():
    assert near_duplicates([], CHAR13) == ({}, [])
    assert near_duplicates([LIGHTHOUSE], CHAR13) == ({}, [])


def test_threshold_decides_what_is_merged():
    texts = [LIGHTHOUSE, LIGHTHOUSE_REWRITE]
    assert near_duplicates(texts, NearDedupConfig(threshold=0.75, bands=32, rows=4, workers=1))[0] == {1: 0}
    assert near_duplicates(texts, NearDedupConfig(threshold=0.8, bands=32, rows=4, workers=1))[0] == {}


# --- configuration ---


@pytest.mark.parametrize("kwargs, message", [
    ({"unit": "token"}, "unit"),
    ({"bands": 17, "rows": 8}, "exceeds num_perm 128"),
    ({"num_perm": 64}, "exceeds num_perm 64"),  # the default 16 x 8 needs 128
    ({"threshold": 0.0}, "threshold"),
    ({"threshold": 1.5}, "threshold"),
    ({"threshold": -0.2}, "threshold"),
    ({"verify": "jaccard"}, "verify"),
    ({"ngram": 0}, "ngram"),
    ({"chunk_size": 0}, "chunk_size"),
])
def test_near_dedup_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NearDedupConfig(**kwargs)


def test_near_dedup_config_accepts_the_edges():
    assert NearDedupConfig(threshold=1.0).threshold == 1.0
    assert NearDedupConfig(bands=9, rows=13, num_perm=117, verify="none").bands == 9
    assert NearDedupConfig(unit="word", verify="minhash").unit == "word"


# --- clusters ---


def test_union_find_root_is_the_smallest_index():
    groups = UnionFind(7)
    groups.union(5, 3)
    groups.union(6, 5)
    groups.union(3, 1)
    groups.union(4, 2)
    assert [groups.find(i) for i in range(7)] == [0, 1, 2, 1, 2, 1, 1]
    groups.union(6, 2)  # joins {1, 3, 5, 6} and {2, 4}
    assert {groups.find(i) for i in (1, 2, 3, 4, 5, 6)} == {1} and groups.find(0) == 0


def test_clusters_of():
    clusters = clusters_of(9, [(7, 4), (4, 8), (2, 6), (8, 5)])
    assert clusters == [[4, 5, 7, 8], [2, 6]]  # largest first, members sorted, singletons left out
    assert clusters_of(4, [(1, 3), (3, 2), (0, 1)]) == [[0, 1, 2, 3]]
    assert clusters_of(3, []) == [] and clusters_of(0, []) == []
    assert clusters_of(6, [(4, 5), (0, 1)]) == [[0, 1], [4, 5]]  # ties: by first member
