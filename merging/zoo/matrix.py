"""The model x domain matrix of a one-size zoo: base, every expert and the mixture evaluated on every domain,
written as ce_matrix.csv (and accuracy_matrix.csv where measured) with the ce_matrix.png heatmap."""

from __future__ import annotations

import csv
from pathlib import Path

from merging.errors import ConfigError
from merging.evaluate import EvalResult, evaluate
from merging.zoo.layout import expert_folders


def zoo_models(zoo_dir: Path) -> dict[str, Path]:
    """base, every expert and the mixture of a one-size zoo, by display name."""
    models = {"base": zoo_dir / "base"}
    models |= {f"expert:{p.name}": p for p in expert_folders(zoo_dir)}
    if (zoo_dir / "mixture").is_dir():
        models["mixture"] = zoo_dir / "mixture"
    return models


def evaluate_matrix(zoo_dir: str | Path, out_dir: str | Path | None = None, **options) -> dict[str, EvalResult]:
    """Every model of a zoo on every domain; writes ce_matrix.csv and ce_matrix.png to `out_dir`."""
    zoo_dir = Path(zoo_dir)
    if not (zoo_dir / "base").is_dir() or not (zoo_dir / "experts").is_dir():
        raise ConfigError(f"{zoo_dir}: not a zoo folder (expected base/ and experts/; see mergeplan zoo build)")
    results = {name: evaluate(path, zoo_dir / "data", base=zoo_dir / "base", **options)
               for name, path in zoo_models(zoo_dir).items()}
    out_dir = Path(out_dir or zoo_dir)
    write_matrix(results, out_dir / "ce_matrix.csv", out_dir / "ce_matrix.png")
    return results


def write_matrix(results: dict[str, EvalResult], csv_path: Path, png_path: Path) -> None:
    """The CE table (and, where measured, an exact-match accuracy table beside it) and the CE heatmap."""
    domains = [d.domain for d in next(iter(results.values())).domains]
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", *domains, "macro", "micro"])
        for name, result in results.items():
            writer.writerow([name, *(f"{result.ce(d):.4f}" for d in domains), f"{result.macro_ce:.4f}",
                             f"{result.micro_ce:.4f}"])
    if any(d.accuracy is not None for result in results.values() for d in result.domains):
        with open(csv_path.with_name("accuracy_matrix.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["model", *domains])
            for name, result in results.items():
                writer.writerow([name, *("" if d.accuracy is None else f"{d.accuracy:.3f}" for d in result.domains)])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [[result.ce(d) for d in domains] for result in results.values()]
    figure, axes = plt.subplots(figsize=(1.0 + 0.8 * len(domains), 1.0 + 0.45 * len(results)))
    image = axes.imshow(values, cmap="viridis_r", aspect="auto")
    axes.set_xticks(range(len(domains)), domains, rotation=45, ha="right")
    axes.set_yticks(range(len(results)), list(results))
    for row, line in enumerate(values):
        for column, value in enumerate(line):
            axes.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white")
    figure.colorbar(image, label="held-out CE (nats/token)")
    axes.set_title("cross-entropy: model x domain")
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    plt.close(figure)
