"""A sweep over URI storage, read back by export and report from the same URI; and a search
on a multi-node Ray cluster (one machine, loopback): env runners on worker nodes that have no
data, one runner killed and one node removed mid-search."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, run_cli

CONFIG = """
name: {name}
episodes: {episodes}
warmup_episodes: 2
checkpoint_every: 1
buffer_capacity: 2000
env: {{model: resnet20, reward_size: 50, macs_budget: 0.6, calibration: null}}
"""


def _records(trial) -> list[dict]:
    path = trial / "episodes.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_sweep_on_uri_storage_is_read_back_from_the_uri(tmp_path):
    """(Embedded Ray; before the cluster fixture starts.) `autodfp sweep` with `file://` storage (pyarrow's filesystem, as for s3:// or gs://):
    one trial per budget, each with its episode log and best; `report` draws the front and
    `export --budget` rebuilds a trial's best from the same URI."""
    config = tmp_path / "sweep.yaml"
    config.write_text(CONFIG.format(name="sweep", episodes=3))
    storage = f"file://{tmp_path / 'bucket'}"
    result = run_cli("sweep", config, "--budgets", "0.5,0.7", "--storage", storage)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "bucket" / "sweep"
    trials = sorted(run.glob("AutoDFPSAC_*"))
    assert len(trials) == 2
    budgets = sorted(json.loads((t / "params.json").read_text())["env_config"]["macs_budget"]
                     for t in trials)
    assert budgets == [0.5, 0.7]
    for trial in trials:
        budget = json.loads((trial / "params.json").read_text())["env_config"]["macs_budget"]
        records = _records(trial)
        assert len(records) >= 3 and all(r["macs_ratio"] <= budget + 1e-9 for r in records)
    assert "budget 0.5" in result.stdout and "budget 0.7" in result.stdout
    assert (run / "report" / "front.png").read_bytes()[:4] == b"\x89PNG"

    uri = f"{storage}/sweep"
    report = run_cli("report", uri)
    assert report.returncode == 0, report.stderr[-2000:]
    assert f"wrote {uri}/report/front.png" in report.stdout

    out = tmp_path / "exported"
    export = run_cli("export", uri, "--budget", "0.5", "--out", out, "--no-onnx", "--no-eval")
    assert export.returncode == 0, export.stderr[-2000:]
    report_json = json.loads((out / "report.json").read_text())
    assert report_json["ratios"]["macs"] <= 0.5 + 2e-3
    unpicked = run_cli("export", uri, "--out", tmp_path / "x", "--no-onnx", "--no-eval")
    assert unpicked.returncode == 2 and "pick a trial with --budget (0.5, 0.7)" in unpicked.stderr


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head (1 CPU) and two worker nodes (2 CPUs, 2 `worker` slots each: either can take
    the algorithm and both runners). Worker nodes see no data folder and an empty cache."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    empty = tmp_path_factory.mktemp("worker-node")
    worker_env = {"AUTODFP_SHARED": str(empty / "no-shared"), "AUTODFP_CACHE": str(empty)}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=2, resources={"worker": 2},
                                node_ip_address="127.0.0.1", env_vars=worker_env)
               for _ in range(2)]
    cluster.wait_for_nodes()
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def test_runners_on_worker_nodes_survive_a_killed_runner_and_a_removed_node(cluster, tmp_path):
    cluster, workers = cluster
    episodes = 30
    config = tmp_path / "multi.yaml"
    config.write_text(CONFIG.format(name="multi", episodes=episodes)
                      + "runner_resources: {worker: 1}\nrestart_delay_s: 0.5\n")
    driver = subprocess.Popen(
        [sys.executable, "-m", "launch.cli", "search", str(config), "--storage",
         str(tmp_path / "runs"), "--address", cluster.address, "--num-env-runners", "2",
         "--cpus-per-runner", "0.5"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = tmp_path / "runs" / "multi"
    killed = removed = None
    deadline = time.monotonic() + 420
    while driver.poll() is None and time.monotonic() < deadline:
        trials = list(run.glob("AutoDFPSAC_*")) if run.is_dir() else []
        records = _records(trials[0]) if trials else []
        if killed is None and len(records) >= 3:
            killed = records[-1]["runner"]
            before = {r["runner"]["pid"] for r in records}
            os.kill(killed["pid"], signal.SIGKILL)       # one env runner dies mid-search
        elif (killed is not None and removed is None
              and any(r["runner"]["pid"] not in before for r in records)):  # it is back
            node = next(w for w in workers if w.node_id == records[-1]["runner"]["node"])
            cluster.remove_node(node)        # a worker node with runners on it goes away
            removed, removed_at = node.node_id, len(records)
        time.sleep(0.3)
    output = driver.communicate(timeout=60)[0]
    assert driver.returncode == 0, output[-3000:]
    assert removed is not None, "the search ended before the faults"

    trial = next(run.glob("AutoDFPSAC_*"))
    records = _records(trial)
    assert len(records) >= episodes
    assert [r["episode"] for r in records] == list(range(len(records)))
    assert len({r["id"] for r in records}) == len(records)             # each exactly once
    worker_ids = {w.node_id for w in workers}
    assert {r["runner"]["node"] for r in records} <= worker_ids        # never on the head
    # the runners lost with the node were restarted on the other worker node
    assert {r["runner"]["node"] for r in records[removed_at + 2:]} == worker_ids - {removed}
    best = json.loads((trial / "best.json").read_text())
    assert best["accuracy"] == max(r["accuracy"] for r in records)
    results = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
    assert any(r["autodfp"].get("env_runner_restarts", 0) >= 1 for r in results)
    assert results[-1]["autodfp"]["episodes_total"] == len(records)
