"""The zoo's model x domain matrix: the CE table and heatmap, and the accuracy table beside it."""

import csv

from merging.zoo.matrix import evaluate_matrix


def test_cli_matrix_writes_csv_and_heatmap(tiny_zoo, tmp_path, run_cli):
    status, out, err = run_cli("evaluate", "--matrix", tiny_zoo, "--out", tmp_path, "--max-examples", "8",
                               "--accuracy-samples", "0")
    assert status == 0, err
    rows = list(csv.reader((tmp_path / "ce_matrix.csv").read_text().splitlines()))
    assert rows[0][0] == "model" and rows[0][-2:] == ["macro", "micro"] and len(rows[0]) == 1 + 9 + 2
    assert [r[0] for r in rows[1:]] == ["base", *(f"expert:{d}" for d in sorted(
        p.name for p in (tiny_zoo / "experts").iterdir())), "mixture"]
    assert (tmp_path / "ce_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "accuracy_matrix.csv").exists()  # --accuracy-samples 0


def test_matrix_with_accuracy_writes_an_accuracy_table(tiny_zoo, tmp_path):
    results = evaluate_matrix(tiny_zoo, tmp_path, max_examples=4, accuracy_samples=1)
    rows = list(csv.reader((tmp_path / "accuracy_matrix.csv").read_text().splitlines()))
    assert len(rows) == 1 + len(results) and len(rows[1]) == 1 + 9
    assert all(0 <= float(value) <= 1 for row in rows[1:] for value in row[1:])
    assert float(rows[1][1]) == results["base"].domains[0].accuracy
