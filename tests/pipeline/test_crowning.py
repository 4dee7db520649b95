"""The champion rule: the base is the zeroth champion, the margin and the domains that matter."""

from __future__ import annotations

import pytest

from flows.pipeline_config import ChampionRule
from flows.review import Comparison, crowning, worse_than_base
from merging.errors import ConfigError

BASE_CE = {"algebra": 2.0, "code": 3.0}


def comparison(ce: dict[str, float], champion: dict[str, float] | None = None) -> Comparison:
    return Comparison(ce=ce, macro_ce=sum(ce.values()) / len(ce), base_ce=BASE_CE, base_macro_ce=2.5,
                      champion_version="3" if champion else None, champion_ce=champion or {},
                      champion_macro_ce=sum(champion.values()) / len(champion) if champion else None)


def test_the_first_merge_must_beat_the_base():
    worse = crowning(comparison({"algebra": 1.9, "code": 3.2}), ChampionRule(), already_champion=False)
    assert not worse.crowned
    assert worse.verdict.startswith("not crowned: macro CE +0.0500 against the base") and "base stays" in worse.verdict
    better = crowning(comparison({"algebra": 1.9, "code": 3.0}), ChampionRule(), already_champion=False)
    assert better.crowned and better.verdict == "new champion: macro CE -0.0500 against the base"


def test_a_later_merge_must_beat_the_champion_and_the_base_by_the_margin():
    champion = {"algebra": 1.8, "code": 3.0}  # macro 2.4
    assert crowning(comparison({"algebra": 1.7, "code": 3.0}, champion), ChampionRule(), False).verdict == \
        "new champion: macro CE -0.0500 against v3"
    kept = crowning(comparison({"algebra": 1.7, "code": 3.0}, champion), ChampionRule(margin=0.06), False)
    assert not kept.crowned and kept.verdict.startswith("champion v3 kept: macro CE -0.0500 against it")
    worse = crowning(comparison({"algebra": 1.9, "code": 3.2}, champion), ChampionRule(), False)
    assert not worse.crowned and "champion v3 kept" in worse.verdict
    assert crowning(comparison(champion, champion), ChampionRule(), True).verdict == "already the champion"


def test_the_domains_that_matter_replace_the_macro_ce():
    rule = ChampionRule(domains=["algebra"])
    better_on_algebra = crowning(comparison({"algebra": 1.9, "code": 3.5}), rule, False)
    assert better_on_algebra.crowned and "mean CE of algebra -0.1000" in better_on_algebra.verdict
    assert not crowning(comparison({"algebra": 1.9, "code": 3.5}), ChampionRule(), False).crowned
    with pytest.raises(ConfigError, match=r"champion.domains: 'physics' has no CE for this merge"):
        crowning(comparison({"algebra": 1.9, "code": 3.5}), ChampionRule(domains=["physics"]), False)


def test_the_domains_worse_than_the_base_are_named_with_their_gap():
    assert worse_than_base(comparison({"algebra": 1.9, "code": 3.25})) == {"code": 0.25}
