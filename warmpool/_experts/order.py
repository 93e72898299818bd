"""A warm plan in profile order: the dense tensors, then the hottest experts first."""

from __future__ import annotations

import os

from .._plan import Plan, prioritize
from .profile import Profile, check_profile, read_profile
from .slices import expert_slices

__all__ = ["order_by_profile"]


def order_by_profile(plan: Plan, profile: Profile | str | os.PathLike[str]) -> Plan:
    """The plan's pages reordered: everything that is not an expert slice (attention, norms,
    routers, shared experts, embeddings) in plan order, then the selected experts in the
    profile's order, hottest first, then those the profile does not score, in plan order.

    ``profile`` is a Profile or a path to read one from; ProfileError if it cannot be read or
    was made for another model."""
    path = None
    if not isinstance(profile, Profile):
        path = os.fspath(profile)
        profile = read_profile(path)
    check_profile(profile, plan.layout, path)
    slices = expert_slices(plan.layout, {t.name for t in plan.selected})
    rank = {key: i for i, key in enumerate(profile.order())}
    unranked = len(rank)
    ordered = sorted(slices, key=lambda s: (rank.get((s.layer, s.expert), unranked), s.layer, s.expert))
    return prioritize(plan, [s.ranges for s in ordered])
