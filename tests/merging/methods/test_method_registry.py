"""The one method registry: every method with its kind, agreeing with the fold implementations and mergekit's map."""

from merging.mergekit_config import GTA_DEFAULTS
from merging.methods import GROUP_METHODS, METHODS
from merging.methods.registry import REGISTRY, is_calibrated, methods_of_kind


def test_the_fold_methods_are_the_implemented_ones_in_order():
    assert methods_of_kind("fold") == tuple(METHODS)


def test_the_group_methods_are_the_implemented_ones_in_order():
    assert methods_of_kind("group") == tuple(GROUP_METHODS)


def test_the_calibrated_methods():
    assert methods_of_kind("calibrated") == ("expert_merging", "expert_merging_pp", "adamerging")
    assert all(is_calibrated(name) for name in methods_of_kind("calibrated"))


def test_fold_and_unknown_methods_are_not_calibrated():
    assert not any(is_calibrated(name) for name in METHODS)
    assert not is_calibrated("nuslerp") and not is_calibrated("unknown")


def test_every_method_is_listed_once_with_a_one_line_summary():
    names = [method.name for method in REGISTRY]
    assert len(names) == len(set(names)) == len(METHODS) + len(GROUP_METHODS) + 1 + 3
    assert methods_of_kind("stack") == ("passthrough",)
    assert all(method.summary and "\n" not in method.summary for method in REGISTRY)


def test_mergekit_task_vector_methods_are_registered_fold_methods():
    assert set(GTA_DEFAULTS) <= set(methods_of_kind("fold"))
