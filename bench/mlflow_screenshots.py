"""Screenshots of what a reviewer sees in the MLflow UI, taken with headless Chromium (Debian's `chromium`).

A stack of its own (moto S3, MLflow, Prefect) in a temporary folder; the tiny zoo's base and three experts are
stored and registered, and merge-pipeline names them by S3 URI, as the demo does. It runs three times: task
arithmetic at λ 1.0 (worse than the base: not crowned, the base stays the champion), at λ 0.2 (the first
champion), and TIES (compared with that champion). Then Chromium opens the experiment as MLflow opens it, its run
list sorted by macro CE, the last run's page, artifacts and methods chart, the cards of the losing and the
crowned version (lineage with registered versions), and the registered model's versions (aliases head and
champion), and writes one PNG each to --out. The experiment is also shown as the UI opens it by itself (MLflow
3.17 picks GenAI or Model training from its own switch, not from the experiment's kind tag). Run it after a
change to what the flows log, and look at them.

    .venv/bin/python bench/mlflow_screenshots.py --zoo .mergeplan/demo/zoo --out bench/out/screenshots
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from pathlib import Path
from tempfile import TemporaryDirectory
from unittest import mock

from flows.merge_pipeline import merge_pipeline
from flows.pipeline_config import PipelineConfig
from flows.runtime import configured, prefect_api
from infra import stack
from infra.registry import merged_model_name, register_expert
from infra.s3 import expert_uri, upload_expert
from infra.settings import S3_INTERNAL_PORTS, Settings
from infra.stack import free_port_block
from tasks.tracking import experiment_link

BASE = "review-base"
SERVICES = ["s3", "mlflow", "prefect"]
RUNS = [("task_arithmetic", {"lambda": 1.0}), ("task_arithmetic", {"lambda": 0.2}),
        ("ties", {"density": 0.5, "lambda": 0.3})]


def screenshot(chromium: str, url: str, out: Path, profile: Path) -> None:
    """The page at URL after its scripts ran (virtual time lets the single-page app fetch and render)."""
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                    "--hide-scrollbars", "--window-size=1600,1300", "--virtual-time-budget=15000",
                    f"--screenshot={out}", url], check=True, capture_output=True, timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, required=True, help="a built tiny zoo")
    parser.add_argument("--out", type=Path, default=Path("bench/out/screenshots"))
    args = parser.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("error: chromium not found; install it with `apt-get install chromium`")
    zoo = args.zoo.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    with TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        settings = Settings(state_dir=tmp / "state", s3_server="moto", s3_port=free_port_block(S3_INTERNAL_PORTS + 1),
                            mlflow_port=free_port_block(1), prefect_port=free_port_block(1), startup_timeout_s=180)
        stack.up(settings, SERVICES)
        try:
            with mock.patch.dict(os.environ, settings.as_env()), prefect_api(settings):
                upload_expert(zoo / "base", f"s3://{settings.bucket}/bases/{BASE}", settings=settings)
                experts = []
                for domain in ("algebra", "code", "biology"):
                    experts.append(expert_uri(BASE, domain, settings))
                    upload_expert(zoo / "experts" / domain, experts[-1], settings=settings)
                    register_expert(experts[-1], domain, BASE, settings=settings)
                outcomes = []
                for method, params in RUNS:
                    config = PipelineConfig.model_validate({
                        "base": {"name": BASE}, "experts": experts, "method": method, "params": params,
                        "data": zoo / "data", "eval": {"max_examples": 8, "batch_size": 8},
                        "law": {"prefix_points": [1, 2]}})
                    outcomes.append(configured(merge_pipeline, config.runner, settings)(config))
                    print(f"{method} {params}: macro CE {outcomes[-1].macro_ce:.4f}, version "
                          f"{outcomes[-1].version}, champion {outcomes[-1].champion}")
            from mlflow import MlflowClient

            client = MlflowClient(settings.mlflow_tracking_uri)
            last = outcomes[-1]
            experiment = client.get_run(last.run_id).info.experiment_id
            ui = settings.mlflow_tracking_uri
            versions = f"{ui}/#/models/{merged_model_name(BASE)}/versions"
            pages = {
                "experiment_default.png": f"{ui}/#/experiments/{experiment}",  # the UI's own switch: GenAI
                "experiment_runs.png": experiment_link(experiment, settings),  # the link mergeplan prints
                "run.png": last.run_page,
                "run_artifacts.png": last.run_page.replace("?", "/artifacts?"),
                "methods_chart.png": last.run_page.replace("?", "/artifacts/methods/methods.png?"),
                "version_not_crowned.png": f"{versions}/{outcomes[0].version}",
                "version_champion.png": f"{versions}/{outcomes[1].version}",
                "model_versions.png": f"{ui}/#/models/{merged_model_name(BASE)}",
            }
            for name, url in pages.items():
                screenshot(chromium, url, args.out / name, tmp / "chromium")
                print(f"{args.out / name}: {url}")
        finally:
            stack.down(settings, SERVICES)


if __name__ == "__main__":
    main()
