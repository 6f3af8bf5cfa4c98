"""The cluster deployment files in docker/: offline checks that they agree with each other, with
the package's pins and presets, and with Ray's own cluster-config validation."""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
INSTALL = DOCKER / "install.sh"
IMAGE = re.compile(r"^autodfp/autodfp:(cpu|gpu)$")
"""Image names: autodfp/autodfp:<variant>, built by docker/Dockerfile.<variant>."""
SHARED_IN_IMAGE = "/home/ray/shared"

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def ray_pin() -> str:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("ray")]  # an extra only
    deps = project["optional-dependencies"]["search"]
    pins = [m.group(1) for d in deps if (m := re.fullmatch(r"ray(?:\[[^\]]*\])?==([\w.]+)", d))]
    assert len(pins) == 1, f"expected one ray==X pin in the search extra, got {deps}"
    return pins[0]


def dockerfile(variant: str) -> str:
    return (DOCKER / f"Dockerfile.{variant}").read_text()


def instructions(text: str) -> list[str]:
    """Dockerfile instructions, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines()
                                             if not line.lstrip().startswith("#")))
    return [line.strip() for line in joined.splitlines() if line.strip()]


def cluster() -> dict:
    return yaml.safe_load((DOCKER / "cluster.yaml").read_text())


def prepared(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(config))
    validate_config(config)
    return config


def rayjob() -> dict:
    return yaml.safe_load((DOCKER / "rayjob.yaml").read_text())


def dry_run(*args: str, **env: str) -> list[str]:
    result = subprocess.run(["bash", str(INSTALL), "--dry-run", *args], capture_output=True,
                            text=True, timeout=30, env={**os.environ, "PYTHON": "python3", **env})
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


# --- docker/cluster.yaml (ray up) ---------------------------------------------------------

def test_cluster_config_passes_rays_validation():
    config = prepared(cluster())
    assert config["cluster_name"] == "autodfp"
    assert config["provider"]["type"] == "aws"
    # prepare_config merges the provider's defaults.yaml key by key at the top level: left out,
    # setup_commands would pip-install a nightly Ray over the image's.
    for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                "worker_setup_commands"):
        assert config[key] == [], key


@pytest.mark.parametrize("breakage", ["max_workers not an int", "no head_node_type",
                                      "head_node_type unknown", "unknown key",
                                      "GPU count not an int"])
def test_a_broken_cluster_config_is_rejected(breakage):
    import jsonschema

    config = cluster()
    if breakage == "max_workers not an int":
        config["available_node_types"]["gpu_worker"]["max_workers"] = "four"
    elif breakage == "no head_node_type":
        del config["head_node_type"]
    elif breakage == "head_node_type unknown":
        config["head_node_type"] = "gpu-head"
    elif breakage == "unknown key":
        config["max_worker"] = config.pop("max_workers")
    else:
        config["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5
    with pytest.raises((jsonschema.ValidationError, ValueError, KeyError)):
        prepared(config)


def test_cluster_images_are_ours():
    docker = cluster()["docker"]
    head, workers = docker.get("head_image", docker["image"]), docker.get("worker_image",
                                                                        docker["image"])
    for image, variant in ((head, "cpu"), (workers, "gpu")):
        assert IMAGE.match(image), image
        assert image.endswith(f":{variant}")
        assert f"-t {image} " in dockerfile(variant), f"Dockerfile.{variant} builds {image}"
    assert docker["container_name"] and docker["pull_before_run"] is True


def test_cluster_gpu_workers_fit_the_gpu_preset():
    from launch.config import SearchConfig

    config = cluster()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] >= 1
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert list(gpu_types) == ["gpu_worker"]
    worker = gpu_types["gpu_worker"]
    assert worker["node_config"]["InstanceType"].startswith(("g", "p"))  # AWS GPU families
    preset = SearchConfig.load("resnet56-gpu")
    runners = preset.num_env_runners
    assert runners * preset.cpus_per_env_runner <= worker["resources"]["CPU"]
    assert runners * preset.gpus_per_env_runner <= worker["resources"]["GPU"]
    # The search counts the cluster's GPUs when it starts: one GPU worker must be up.
    assert worker["min_workers"] >= 1
    assert worker["max_workers"] <= config["max_workers"]


def test_cluster_dashboard_listens_on_loopback_only():
    config = cluster()
    head_start = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert len(head_start) == 1 and "--head" in head_start[0]
    hosts = re.findall(r"--dashboard-host[= ](\S+)", head_start[0])
    assert hosts == ["127.0.0.1"]
    assert "--port=6379" in head_start[0]
    for command in config["worker_start_ray_commands"]:
        assert "--dashboard-host" not in command and "--head" not in command
    assert any("--address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])


def test_cluster_mounts_shared_where_the_images_look():
    mounts = cluster()["file_mounts"]
    assert list(mounts) == [SHARED_IN_IMAGE]
    assert Path(mounts[SHARED_IN_IMAGE]) == Path("../shared")  # beside the repository root


# --- Dockerfiles and install.sh -------------------------------------------------------------

@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_dockerfile_builds_on_the_pinned_ray(variant):
    steps = instructions(dockerfile(variant))
    froms = [s for s in steps if s.upper().startswith("FROM ")]
    assert froms == [f"FROM rayproject/ray:{ray_pin()}-py311-{variant}"]


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_dockerfile_installs_with_the_makefiles_script(variant):
    steps = instructions(dockerfile(variant))
    runs = [s for s in steps if s.upper().startswith("RUN ")]
    installs = [s for s in runs if "docker/install.sh" in s]
    assert len(installs) == 1
    words = shlex.split(installs[0])
    assert "--system" in words and "--no-editable" in words and "-e" not in words
    assert "PYTHON=/home/ray/anaconda3/bin/python" in words
    cpu_index = "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"
    assert (cpu_index in words) == (variant == "cpu")
    assert not any(re.search(r"\bpip3? install\b", s) for s in runs), "pip only via install.sh"
    # The package only: nothing from ../shared, and the driver finds it via AUTODFP_SHARED.
    copies = [s for s in steps if s.upper().startswith(("COPY ", "ADD "))]
    assert copies and not any("shared" in s for s in copies)
    assert f"ENV AUTODFP_SHARED={SHARED_IN_IMAGE}" in steps


def test_makefile_installs_with_the_same_script():
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = lines.index(next(line for line in lines if line.startswith("$(STAMP):")))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    assert recipe[-1] == "touch $(STAMP)"
    assert any("docker/install.sh" in line and "--venv $(VENV)" in line
               and "PYTHON=$(PYTHON)" in line for line in recipe)
    assert not any("pip install" in line for line in recipe), "pip only via install.sh"


def test_dockerignore_keeps_local_state_out():
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {".venv", "out", "runs", ".git", "*.egg-info"} <= patterns
    assert any("__pycache__" in p for p in patterns)
    assert not {"README.md", "pyproject.toml", "launch", "autodfp", "envs", "docker"} & patterns


@needs_bash
def test_install_dry_run_puts_torch_before_the_package():
    lines = dry_run("--venv", "some venv")
    assert lines[0] == "python3 -m venv 'some venv'"
    torch = [i for i, line in enumerate(lines) if "torch==2.13.0" in line]
    package = [i for i, line in enumerate(lines) if str(ROOT) in line]
    assert torch == [1] and package == [2], lines
    assert lines[1] == "'some venv/bin/pip' install --quiet torch==2.13.0"
    assert shlex.split(lines[2]) == ["some venv/bin/pip", "install", "--quiet", "-e",
                                     f"{ROOT}[search,test,onnx,imagenet,dashboard]"]


@needs_bash
def test_install_dry_run_for_an_image():
    lines = dry_run("--system", "--no-editable", "--extras", "onnx",
                    PYTHON="/opt/py/bin/python", TORCH_INDEX_URL="https://example.invalid/cpu")
    assert [shlex.split(line) for line in lines] == [
        ["/opt/py/bin/python", "-m", "pip", "install", "--quiet", "torch==2.13.0",
         "--index-url", "https://example.invalid/cpu"],
        ["/opt/py/bin/python", "-m", "pip", "install", "--quiet", f"{ROOT}[onnx]"],
    ]
    assert shlex.split(dry_run("--system", "--extras", "")[-1])[-2:] == ["-e", str(ROOT)]


@needs_bash
def test_install_runs_what_its_dry_run_prints(tmp_path):
    """Not a dry run: a stand-in Python logs each command (its venv's pip too)."""
    log = tmp_path / "log"
    fake = tmp_path / "fakepython"
    fake.write_text(f"""#!/usr/bin/env bash
echo "python $*" >> {shlex.quote(str(log))}
if [[ "$1 $2" == "-m venv" ]]; then
    mkdir -p "$3/bin"
    printf '#!/usr/bin/env bash\\necho "pip $*" >> %q\\n' {shlex.quote(str(log))} > "$3/bin/pip"
    chmod +x "$3/bin/pip"
fi
""")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    venv = tmp_path / "venv"
    result = subprocess.run(["bash", str(INSTALL), "--venv", str(venv), "--extras", "test"],
                            capture_output=True, text=True, timeout=30, cwd=tmp_path,
                            env={**os.environ, "PYTHON": str(fake)})
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines() == [
        f"python -m venv {venv}",
        "pip install --quiet torch==2.13.0",
        f"pip install --quiet -e {ROOT}[test]",
    ]


@needs_bash
@pytest.mark.parametrize("args", [["--bogus"], ["--extras", "test;rm -rf /"], ["--venv"]])
def test_install_rejects_bad_arguments(args):
    result = subprocess.run(["bash", str(INSTALL), "--dry-run", *args], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2 and result.stdout == ""
    assert "install.sh:" in result.stderr


# --- docker/rayjob.yaml (KubeRay) ---------------------------------------------------------

def test_rayjob_runs_a_preset_search_on_the_pinned_ray():
    from launch.config import PRESETS_DIR, SearchConfig

    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["rayClusterSpec"]["rayVersion"] == ray_pin()
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    words = shlex.split(spec["entrypoint"])
    assert words[:2] == ["autodfp", "search"]
    preset = words[2]
    assert (PRESETS_DIR / f"{preset}.yaml").is_file() or (ROOT / preset).is_file()
    SearchConfig.load(preset)
    # The entrypoint runs inside the cluster: it must join it, not start a Ray of its own.
    assert words[words.index("--address") + 1] == "auto"


def pods(spec: dict) -> dict:
    cluster_spec = spec["rayClusterSpec"]
    groups = {"head": cluster_spec["headGroupSpec"]}
    groups.update({g["groupName"]: g for g in cluster_spec["workerGroupSpecs"]})
    return groups


def test_rayjob_gpu_workers_fit_the_preset():
    from launch.config import SearchConfig

    spec = rayjob()["spec"]
    groups = pods(spec)
    gpu = groups["gpu-workers"]
    [container] = gpu["template"]["spec"]["containers"]
    limits = container["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    assert IMAGE.match(container["image"]) and container["image"].endswith(":gpu")
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"] and gpu["minReplicas"] >= 1
    preset = SearchConfig.load(shlex.split(spec["entrypoint"])[2])
    assert preset.num_env_runners * preset.cpus_per_env_runner <= float(limits["cpu"])
    assert preset.num_env_runners * preset.gpus_per_env_runner <= int(limits["nvidia.com/gpu"])
    [head] = groups["head"]["template"]["spec"]["containers"]
    assert IMAGE.match(head["image"])
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})


def test_rayjob_head_and_workers_share_the_run_volume():
    spec = rayjob()["spec"]
    words = shlex.split(spec["entrypoint"])
    storage = words[words.index("--storage") + 1]
    runs = {}
    for name, group in pods(spec).items():
        pod = group["template"]["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        [container] = pod["containers"]
        mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
        assert storage in mounts and not mounts[storage].get("readOnly", False), name
        runs[name] = (claims[mounts[storage]["name"]], mounts[storage].get("subPath"))
        if name == "head":  # the driver reads weights and images from $AUTODFP_SHARED
            shared = mounts[SHARED_IN_IMAGE]
            assert claims[shared["name"]] == "autodfp-runs"
            assert shared.get("subPath") != runs[name][1]
    assert set(runs) == {"head", "gpu-workers"}
    assert set(runs.values()) == {("autodfp-runs", "runs")}


def test_rayjob_dashboard_stays_inside_kubernetes():
    head = rayjob()["spec"]["rayClusterSpec"]["headGroupSpec"]
    # KubeRay's operator and submitter reach the job API through the head Service: no
    # loopback here, but no LoadBalancer or NodePort either.
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert head["rayStartParams"].get("dashboard-host", "0.0.0.0") == "0.0.0.0"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
