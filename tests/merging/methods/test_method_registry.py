"""The one method registry: every method with its kind, agreeing with the fold implementations and mergekit's map."""

from merging.mergekit_config import SHARED_METHODS
from merging.methods import METHODS
from merging.methods.registry import REGISTRY, is_calibrated, methods_of_kind


def test_the_fold_methods_are_the_implemented_ones_in_order():
    assert methods_of_kind("fold") == tuple(METHODS)


def test_the_calibrated_methods():
    assert methods_of_kind("calibrated") == ("expert_merging", "expert_merging_pp", "adamerging")
    assert all(is_calibrated(name) for name in methods_of_kind("calibrated"))


def test_fold_and_unknown_methods_are_not_calibrated():
    assert not any(is_calibrated(name) for name in METHODS)
    assert not is_calibrated("nuslerp")


def test_every_method_is_listed_once_with_a_one_line_summary():
    names = [method.name for method in REGISTRY]
    assert len(names) == len(set(names)) == len(METHODS) + 3
    assert all(method.summary and "\n" not in method.summary for method in REGISTRY)


def test_mergekit_methods_map_to_registered_fold_methods():
    assert {ours for ours, _ in SHARED_METHODS.values()} <= set(methods_of_kind("fold"))
