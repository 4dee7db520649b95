"""Screenshots of what a reviewer sees in the MLflow UI, taken with headless Chromium (Debian's `chromium`).

A stack of its own (moto S3, MLflow, Prefect) in a temporary folder; the tiny zoo's base and three experts are
stored and registered; merge-pipeline runs twice (task_arithmetic, then ties), so the second is compared with a
champion. Then Chromium opens the second run's page, its artifacts and methods chart, its merged model version's
page, the registered model's versions (aliases head and champion) and the experiment's run list, and writes one
PNG each to --out. Run it after a change to what the flows log, and look at the pictures.

    .venv/bin/python bench/mlflow_screenshots.py --zoo .mergeplan/zoo-t --out bench/out/screenshots
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

BASE = "review-base"
SERVICES = ["s3", "mlflow", "prefect"]


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
                for domain in ("algebra", "code", "biology"):
                    uri = expert_uri(BASE, domain, settings)
                    upload_expert(zoo / "experts" / domain, uri, settings=settings)
                    register_expert(uri, domain, BASE, settings=settings)
                outcomes = []
                for method, params in (("task_arithmetic", {"lambda": 0.3}), ("ties", {"density": 0.5})):
                    config = PipelineConfig.model_validate({
                        "base": {"name": BASE}, "method": method, "params": params, "data": zoo / "data",
                        "eval": {"max_examples": 8, "batch_size": 8}, "law": {"prefix_points": [1, 2]}})
                    outcomes.append(configured(merge_pipeline, config.runner, settings)(config))
            from mlflow import MlflowClient

            client = MlflowClient(settings.mlflow_tracking_uri)
            last = outcomes[-1]
            experiment = client.get_run(last.run_id).info.experiment_id
            ui = settings.mlflow_tracking_uri
            run_page = f"{ui}/#/experiments/{experiment}/runs/{last.run_id}"
            pages = {
                "run.png": run_page,
                "model_version.png": f"{ui}/#/models/{merged_model_name(BASE)}/versions/{last.version}",
                "experiment_runs.png": f"{ui}/#/experiments/{experiment}/runs",
                "run_artifacts.png": f"{run_page}/artifacts",
                "methods_chart.png": f"{run_page}/artifacts/methods/methods.png",
                "model_versions.png": f"{ui}/#/models/{merged_model_name(BASE)}",
            }
            for name, url in pages.items():
                screenshot(chromium, url, args.out / name, tmp / "chromium")
                print(f"{args.out / name}: {url}")
        finally:
            stack.down(settings, SERVICES)


if __name__ == "__main__":
    main()
