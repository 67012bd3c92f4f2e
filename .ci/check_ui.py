"""After the README's run command: start the MLflow UI on the default store and check, through
its REST API (what the browser's runs table reads), that the study's runs are listed with
their FIDs and schedule artifacts."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path


def get(base: str, endpoint: str, **query) -> dict:
    url = f"{base}{endpoint}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def main(experiment: str = "digits") -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    ui = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
                           f"sqlite:///{Path('mlflow.db').resolve()}", "--port", str(port)],
                          env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or ui.poll() is not None:
                    sys.exit("mlflow ui did not start")
                time.sleep(0.5)
        exp = get(base, "/api/2.0/mlflow/experiments/get-by-name", experiment_name=experiment)["experiment"]
        req = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", method="POST",
                                     data=json.dumps({"experiment_ids": [exp["experiment_id"]],
                                                      "max_results": 1000}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            runs = json.loads(r.read()).get("runs", [])
        children = [r for r in runs if any(t["key"] == "mlflow.parentRunId" for t in r["data"].get("tags", []))]
        assert children, "no child runs listed"
        for run in children:
            metrics = {m["key"]: m["value"] for m in run["data"].get("metrics", [])}
            files = {f["path"] for f in get(base, "/api/2.0/mlflow/artifacts/list", run_id=run["info"]["run_id"],
                                            path="result").get("files", [])}
            if run["info"]["status"] == "FINISHED":   # every run ranked on the selection seeds
                assert {"fid_select", "fid_select_low", "fid_select_high"} <= set(metrics), run["info"]["run_name"]
                assert files & {"result/schedule.json", "result/per_sample.npz"}, (run["info"]["run_name"], files)
        chosen = [r for r in children if any(t["key"] == "ats.chosen" for t in r["data"].get("tags", []))]
        for run in chosen:   # the chosen trials: held-out FID with its interval and the paired change
            metrics = {m["key"]: m["value"] for m in run["data"].get("metrics", [])}
            assert {"fid_eval", "fid_eval_low", "vs_best_baseline_pct", "vs_best_baseline_low"} <= set(metrics), \
                run["info"]["run_name"]
        assert chosen, "no chosen trial is tagged ats.chosen"
        print(f"MLflow UI at {base}/#/experiments/{exp['experiment_id']}/runs lists {len(children)} runs of "
              f"{experiment} with FIDs and schedule artifacts")
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(20)


if __name__ == "__main__":
    main(*sys.argv[1:])
