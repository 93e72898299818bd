"""Which experts a keeper holds when the selection does not fit, and how the held set follows
the ranking: the hottest first, at most ``CHURN`` of it swapped per re-ranking, and no swap
while the ranking stands (``_keep/hot.py``).  The ranking is set through a profile, as
``keep --profile`` sets it."""

from __future__ import annotations

import time

from warmpool import plan_model
from warmpool._experts.profile import Profile, model_identity
from warmpool._keep.hot import CHURN, CHURN_MIN, HotExperts


def _profile(plan, keys, hot_keys):
    """Scores that put ``hot_keys`` first, in their order, and every other expert at 0."""
    scores = dict.fromkeys(keys, 0.0)
    for rank, key in enumerate(hot_keys):
        scores[key] = 2.0 - rank / len(hot_keys)
    return Profile(model_identity(plan.layout), scores, samples=100, seconds=60.0, created=time.time())


def test_hold_the_hottest_then_follow_a_shift_in_bounded_steps(test_model):
    plan = plan_model(test_model, n_gpu_layers=99, cpu_moe=True)  # the experts (and token_embd)
    hot = HotExperts.of(plan)
    keys = sorted(hot.slices)
    a, b = keys[: len(keys) // 4], keys[-(len(keys) // 4):]  # two disjoint hot quarters
    hot.ranker.from_profile(_profile(plan, keys, a))
    room = hot.dense_bytes + sum(hot.nbytes(k) for k in a)  # room for a quarter of the experts
    held = hot.fill(room)
    assert set(held) == set(a)  # the dense part first, then the hottest, while they fit
    # Room for all of them: still only the experts with evidence of use (the rest score 0).
    assert set(hot.fill(hot.dense_bytes + sum(hot.nbytes(k) for k in keys))) == set(a)
    assert hot.rerank(room * 4, held) == ([], [])

    assert hot.rerank(room, held) == ([], [])  # the ranking stands: nothing moves

    hot.ranker.from_profile(_profile(plan, keys, b))  # use shifts to the other quarter
    steps, limit = 0, max(CHURN_MIN, int(len(held) * CHURN))
    while set(held) != set(b):
        add, drop = hot.rerank(room, held)
        assert add and len(add) <= limit and set(add) <= set(b) and set(drop) <= set(a)
        held = [k for k in held if k not in drop] + add
        assert hot.dense_bytes + sum(hot.nbytes(k) for k in held) <= room
        steps += 1
    assert steps >= len(b) / limit  # bounded churn: a shift is followed in several steps
    assert hot.rerank(room, held) == ([], [])  # and then it stands again


def test_the_first_fill_after_learning_is_whole_and_later_steps_are_bounded(test_model):
    """Without a profile the keeper holds no experts while it learns (``provisional``); the first
    re-ranking on the learned ranking then fills the room at once (``bounded=False``), where a
    bounded step would take only ``CHURN`` of it."""
    plan = plan_model(test_model, n_gpu_layers=99, cpu_moe=True)
    hot = HotExperts.of(plan)
    assert hot.provisional  # no profile
    keys = sorted(hot.slices)
    b = keys[-(len(keys) // 4):]
    room = hot.dense_bytes + sum(hot.nbytes(k) for k in b)
    hot.ranker.from_profile(_profile(plan, keys, b))  # what the samples taught
    limit = max(CHURN_MIN, int(len(b) * CHURN))
    assert len(b) > 2 * limit  # else bounded and unbounded would not differ here

    add, drop = hot.rerank(room, [], bounded=False)
    assert set(add) == set(b) and drop == []
    bounded, _ = hot.rerank(room, [])
    assert 0 < len(bounded) <= CHURN_MIN  # CHURN of nothing held: the minimum step

    assert not HotExperts.of(plan, _profile(plan, keys, b)).provisional  # a profile is not a guess
