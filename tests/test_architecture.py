"""The house rules the layout promises: imports run one way, down the floors and down merging's own layers,
the library never touches a service, and no module grows past 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FLOORS = {"merging": 0, "infra": 1, "tasks": 2, "flows": 3, "mergeplan": 4}
SERVICE_PACKAGES = {"prefect", "prefect_dask", "mlflow", "boto3", "botocore", "moto", "dask", "distributed"}
# merging/ inside: a layer imports only from its own layer or those below it.
MERGING_LAYERS = {
    "errors": 0, "seeding": 0, "progress_bar": 0,
    "io": 1, "data": 1, "model_refs": 1, "parameters": 1,
    "methods": 2, "experts": 2, "lora_on_model": 2, "config": 2, "mergekit_config": 2, "mergekit_slices": 2,
    "tensor_plan": 2, "streaming": 2,
    "model_card": 2,
    "merger": 3, "stacking": 3, "calibration": 3, "evaluate": 3, "lora_export": 3,
    "zoo": 4,
    "sweep": 5,
    "scaling_law": 6,
}
MAX_LINES = 500


def modules(floor: str) -> list[Path]:
    return sorted((REPO / floor).rglob("*.py"))


def imported(path: Path) -> set[str]:
    """Every module name an import statement in the file names, function-local imports included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def merging_layer(module: str) -> int:
    parts = module.split(".")
    if parts == ["merging"]:
        return max(MERGING_LAYERS.values())  # merging/__init__.py is the face: it may name anything
    return MERGING_LAYERS[parts[1]]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("floor", FLOORS)
def test_imports_run_down_the_floors(floor):
    upward = [f"{path.relative_to(REPO)} imports {name}" for path in modules(floor) for name in imported(path)
              if name.split(".")[0] in FLOORS and FLOORS[name.split(".")[0]] > FLOORS[floor]]
    assert upward == []


def test_the_library_never_imports_a_service_client():
    services = [f"{path.relative_to(REPO)} imports {name}" for path in modules("merging") for name in imported(path)
                if name.split(".")[0] in SERVICE_PACKAGES]
    assert services == []


def test_every_merging_module_has_a_layer():
    assert {module_name(path).split(".")[1] for path in modules("merging") if path.parent != REPO / "merging"
            or path.name != "__init__.py"} <= set(MERGING_LAYERS)


def test_merging_imports_run_down_its_layers():
    upward = []
    for path in modules("merging"):
        own = module_name(path)
        if own == "merging":
            continue
        upward += [f"{own} imports {name}" for name in imported(path) if name.split(".")[0] == "merging"
                   and name != "merging" and merging_layer(name) > merging_layer(own)]
    assert upward == []


def test_no_module_over_the_limit():
    long = {str(path.relative_to(REPO)): lines for floor in FLOORS for path in modules(floor)
            if (lines := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}
