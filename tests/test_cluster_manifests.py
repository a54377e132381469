"""The shipped cluster manifests and Grafana files are valid and agree with the code: the
Ray cluster launcher's own schema accepts ray-cluster.yaml, the RayJob's entrypoint is a
valid `python -m launcher train` command line for a Ray job, the ports the manifests
open and scrape are the exporters' ports, and the dashboard is well-formed Grafana JSON
whose data source is the provisioned one."""

import copy
import glob
import json
import os
import re
import shlex

import yaml

from cluster.config import ClusterConfig
from launcher.config import load_config
from launcher.deepspeed_config import build_deepspeed_config
from launcher.preflight import check_paths_for_job

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(REPO, "cluster")
BASE_PORT = ClusterConfig().metrics_port_base
GPUS_PER_NODE = 8


def load(*parts: str):
    with open(os.path.join(CLUSTER, *parts)) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def test_every_config_named_in_the_manifests_exists():
    named = set()
    for path in glob.glob(os.path.join(CLUSTER, "**", "*.y*ml"), recursive=True):
        with open(path) as f:
            named |= set(re.findall(r"configs/[\w.-]+\.yaml", f.read()))
    assert named
    for name in named:
        assert os.path.isfile(os.path.join(REPO, name)), name


def test_ray_cluster_launcher_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    (config,) = load("ray-cluster.yaml")
    validate_config(prepare_config(copy.deepcopy(config)))  # Ray's schema and defaults, as `ray up` does
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu_types = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert gpu_types and all(t["node_config"]["InstanceType"].startswith(("p4d", "p5")) for t in gpu_types)
    rules = config["provider"]["security_group"]["IpPermissions"]
    assert {"FromPort": BASE_PORT, "ToPort": BASE_PORT + GPUS_PER_NODE - 1} in [
        {k: r[k] for k in ("FromPort", "ToPort")} for r in rules
    ]
    setup = " ".join(config["setup_commands"])
    assert "make install" in setup and "/mnt/shared" in setup  # pinned install, shared storage
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE=token" in " ".join(config[key])
    assert "~/.ray/auth_token" in config["file_mounts"]


def rayjob_parts():
    docs = {doc["kind"]: doc for doc in load("kubernetes", "rayjob.yaml")}
    job = docs["RayJob"]
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    return docs["PersistentVolumeClaim"], job, workers


def test_rayjob_entrypoint_is_a_valid_training_command():
    pvc, job, workers = rayjob_parts()
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:5] == ["python", "-m", "launcher", "train", "--config"]
    config_path = argv[5]
    assert config_path.startswith("/app/configs/")  # the repository's place in the image
    overrides = [value for flag, value in zip(argv[6::2], argv[7::2]) if flag == "--set"]
    assert len(overrides) * 2 == len(argv) - 6, argv
    cfg = load_config(
        os.path.join(REPO, config_path.removeprefix("/app/")), overrides
    )  # strict keys and types
    check_paths_for_job(cfg, in_job=True)  # absolute paths, as a Ray job needs
    build_deepspeed_config(cfg.train, cfg.data.batch_size)

    mount = "/mnt/shared"
    for path in (cfg.train.output_dir, cfg.data.train_manifest, cfg.data.val_manifest):
        assert path.startswith(mount + "/"), path  # on the shared volume
    assert cfg.cluster.use_gpu and cfg.cluster.metrics_port_base == BASE_PORT
    gpus = sum(
        g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for g in workers
    )
    assert cfg.cluster.num_workers == gpus
    cpus = int(workers[0]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert cfg.cluster.cpus_per_worker * GPUS_PER_NODE <= cpus

    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    for pod in (head, *(g["template"]["spec"] for g in workers)):
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        }
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert claims[mounts[mount]] == pvc["metadata"]["name"]
    submitter = job["spec"]["submitterPodTemplate"]["spec"]
    for pod in (head, submitter, *(g["template"]["spec"] for g in workers)):
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token" and "RAY_AUTH_TOKEN" in env


def test_podmonitor_scrapes_the_worker_exporter_ports():
    _, _, workers = rayjob_parts()
    (monitor,) = load("kubernetes", "podmonitor.yaml")
    pod = workers[0]["template"]
    ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    exporter_ports = {name: port for name, port in ports.items() if name.startswith("segscale-")}
    assert sorted(exporter_ports.values()) == list(range(BASE_PORT, BASE_PORT + GPUS_PER_NODE))
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} == set(exporter_ports)
    selector = monitor["spec"]["selector"]["matchLabels"]
    pod_labels = {**pod["metadata"]["labels"], "ray.io/node-type": "worker"}  # KubeRay adds the node type
    assert selector.items() <= pod_labels.items()


def test_grafana_dashboard_and_provisioning():
    with open(os.path.join(CLUSTER, "grafana", "dashboards", "segscale.json")) as f:
        dashboard = json.load(f)
    (datasources,) = load("grafana", "provisioning", "datasources", "prometheus.yaml")
    (providers,) = load("grafana", "provisioning", "dashboards", "segscale.yaml")
    source = datasources["datasources"][0]
    assert source["type"] == "prometheus" and providers["providers"][0]["type"] == "file"

    assert dashboard["uid"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["current"]["value"] == source["uid"]
    assert variables["rank"]["multi"] and variables["rank"]["allValue"] == ".*"
    # Every run is listed from its worker's start, before its first step (tests/test_monitoring_walkthrough.py).
    assert "segscale_start_timestamp_seconds" in variables["run"]["definition"]

    panels = [p for top in dashboard["panels"] for p in (top, *top.get("panels", []))]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        area = {
            (x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & area, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"]), panel["title"]
        for target in panel["targets"]:  # one run; ranks by the multi-value variable
            assert 'run="$run"' in target["expr"], target["expr"]


def _queries():
    """Every PromQL expression of the dashboard (panels and variables) and the alert rules."""
    with open(os.path.join(CLUSTER, "grafana", "dashboards", "segscale.json")) as f:
        dashboard = json.load(f)
    panels = [p for top in dashboard["panels"] for p in (top, *top.get("panels", []))]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v.get("definition")]
    (rules,) = load("prometheus", "alerts.yml")
    exprs += [r["expr"] for group in rules["groups"] for r in group["rules"]]
    return exprs


def test_dashboard_and_alerts_query_only_exported_series_and_labels():
    """Without a Prometheus (test_observability.py scrapes a real run): each metric the
    queries read is one cluster/metrics.py exports, and each label they match or group
    by is one its series carry, so a renamed metric or label cannot leave a panel empty."""
    from cluster.metrics import WorkerMetrics

    metrics = WorkerMetrics(run="r", rank=0)
    metrics.observe_step(1, 1.0, {"loss_ce": 1.0}, 2, 0.5, 0.1, 1e-4, grad_norm=1.0, mfu=0.1)
    metrics.observe_throughput(4.0)  # set once per logging window
    series, labels = set(), {"le"}
    for family in metrics.registry.collect():
        for sample in family.samples:
            series.add(sample.name)
            labels |= set(sample.labels)
    exprs = _queries()
    queried = {name for expr in exprs for name in re.findall(r"\bsegscale_[a-z_]+", expr)}
    assert len(queried) > 10 and queried <= series, sorted(queried - series)
    matched = {name for expr in exprs for name in re.findall(r"([a-z_]+)\s*(?:=~|!=|=)\s*\"", expr)}
    grouped = {name.strip() for expr in exprs for group in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", expr)
               for name in group.split(",")}
    assert matched | grouped <= labels, sorted((matched | grouped) - labels)
