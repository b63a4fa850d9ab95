"""The deployment recipes in deploy/: systemd, Docker, Kubernetes, keepalived, Grafana.

No systemd, Docker engine, Kubernetes or Grafana runs on the test machine, so
each recipe is checked as far as the machine allows: the unit files by
``systemd-analyze verify`` and ``security`` when installed (and always parsed),
the keepalived file by ``keepalived --config-test`` when installed (and always
parsed), the Dockerfile and the manifests parsed; every fastlb config a recipe
ships goes through fastlb's own loader; the health commands that Docker and
keepalived run are run against a real fastlb, running and draining; every
metric the Grafana dashboard queries is looked up in a real ``/metrics``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, free_port, wait_until
from faults import DELAY
from fastlb import configfile
from fastlb.settings import SETTINGS

DEPLOY = ROOT / "deploy"
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
DRAIN_DEFAULT = next(s.default for s in SETTINGS if s.name == "drain_timeout")


def config_from_toml(text: str, tmp_path: Path):
    """A fastlb Config from TOML text, through the loader and checks ``fastlb --config`` uses."""
    path = tmp_path / "fastlb.toml"
    path.write_text(text)
    values = {setting.name: setting.default for setting in SETTINGS}
    values.update(configfile.load(str(path)))
    assert "port" in values and values["backends"], "the config must give listen and backends"
    return configfile.complete(values, configfile.location(str(path), "backends"))


def admin_status(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        return int(sock.recv(64)[9:12])


# -- systemd -----------------------------------------------------------------------

def read_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file as {section: [(key, value), ...]}; keys may repeat, as systemd allows."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, "%s:%d: not KEY=VALUE in a section" % (path.name, number)
        current.append((key.strip(), value.strip()))
    return sections


def unit_value(unit: dict, section: str, key: str) -> str:
    values = [v for k, v in unit.get(section, []) if k == key]
    assert values, "no %s= in [%s]" % (key, section)
    return values[-1]


def seconds_of(text: str) -> float:
    """A systemd time span in plain seconds or with s/min units (45, 45s, 1min 30s)."""
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(min|s|ms)?", text):
        total += float(number) * {"min": 60, "s": 1, "": 1, "ms": 0.001}[unit]
    return total


def test_service_unit_is_a_notify_service_that_outlasts_the_drain_and_holds_no_privilege():
    unit = read_unit(DEPLOY / "fastlb.service")
    service = dict(unit["Service"])
    assert service["Type"] == "notify"
    assert service["ExecStart"] == "/usr/local/bin/fastlb --config /etc/fastlb/fastlb.toml"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["KillSignal"] == "SIGTERM"
    assert service["Restart"] == "on-failure"
    assert int(service["LimitNOFILE"]) >= 65536
    assert seconds_of(service["TimeoutStopSec"]) > DRAIN_DEFAULT
    assert service["DynamicUser"] == "yes" or service.get("User") not in (None, "root", "0")
    assert service["CapabilityBoundingSet"] == service["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                       ("PrivateTmp", "yes")):
        assert service[key] == value, key
    assert unit_value(unit, "Install", "WantedBy") == "multi-user.target"


def test_example_config_loads_and_drains_within_the_units_stop_timeout(tmp_path):
    config = config_from_toml((DEPLOY / "fastlb.toml").read_text(), tmp_path)
    service = dict(read_unit(DEPLOY / "fastlb.service")["Service"])
    assert config.drain_timeout < seconds_of(service["TimeoutStopSec"])
    socket_unit = dict(read_unit(DEPLOY / "fastlb.socket")["Socket"])
    # systemd holds the address the config listens on.
    assert socket_unit["ListenStream"] == "%s:%d" % (config.bind, config.port)
    # keepalived's check and the admin endpoint agree on the port.
    assert config.admin.rpartition(":")[2] == "9100"


def test_socket_unit_holds_the_listening_socket_for_the_service():
    unit = read_unit(DEPLOY / "fastlb.socket")
    sock = dict(unit["Socket"])
    assert sock["ListenStream"]
    assert sock["NoDelay"] == "yes"
    assert int(sock["Backlog"]) >= 1024
    assert sock.get("Service", "fastlb.service") == "fastlb.service"
    assert "Accept" not in sock or sock["Accept"] == "no"     # one listening socket, not inetd style
    assert unit_value(unit, "Install", "WantedBy") == "sockets.target"


def test_unit_files_pass_systemd_analyze_verify_and_security(tmp_path):
    analyze = shutil.which("systemd-analyze", path=SBIN_PATH)
    if not analyze:
        pytest.skip("systemd-analyze is not installed (the unit files are parsed by the tests above)")
    # verify insists that ExecStart's program exists; /usr/local/bin/fastlb is
    # where an install puts it, not where this checkout's is.
    fastlb = Path(sys.executable).with_name("fastlb")
    assert fastlb.exists(), fastlb
    text = (DEPLOY / "fastlb.service").read_text()
    (tmp_path / "fastlb.service").write_text(text.replace("/usr/local/bin/fastlb", str(fastlb)))
    shutil.copy(DEPLOY / "fastlb.socket", tmp_path / "fastlb.socket")
    done = subprocess.run([analyze, "verify", "fastlb.service", "fastlb.socket"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    # The exposure score of the hardening options: 0 is the best, 10 the worst.
    done = subprocess.run([analyze, "security", "--offline=yes", "--threshold=25", "fastlb.service"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr
    assert re.search(r"Overall exposure level for fastlb.service: [0-2]\.\d", done.stdout), done.stdout[-300:]


# -- Docker ------------------------------------------------------------------------

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        pending += stripped
        word, _, rest = pending.partition(" ")
        instructions.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, "a continuation line ends the Dockerfile"
    return instructions


def stages(instructions) -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for word, rest in instructions:
        if word == "FROM":
            found.append([])
        assert found, "an instruction before the first FROM: %s" % word
        found[-1].append((word, rest))
    return found


def test_dockerfile_builds_a_compiled_wheel_and_runs_it_slim_and_not_as_root():
    build, run = stages(dockerfile_instructions(DEPLOY / "Dockerfile"))
    assert build[0] == ("FROM", "python:3.11 AS build")
    assert run[0] == ("FROM", "python:3.11-slim")
    # A failed compile fails the build: the variable is set before the wheel is built.
    words = [w for w, _ in build]
    env = words.index("ENV")
    assert "FASTLB_REQUIRE_EXTENSIONS=1" in build[env][1]
    wheel = next(i for i, (w, rest) in enumerate(build) if w == "RUN" and "pip wheel" in rest)
    assert env < wheel and "IMPLEMENTATION == 'cython'" in build[wheel][1]
    # Every file the build stage copies exists in the repository.
    for word, rest in build:
        if word == "COPY":
            for source in rest.split()[:-1]:
                assert list(ROOT.glob(source)), "COPY %s matches nothing" % source

    final = dict(run)
    assert any(w == "COPY" and rest.startswith("--from=build ") for w, rest in run)
    users = [rest for w, rest in run if w == "USER"]
    assert users and all(u.split(":")[0] not in ("0", "root") for u in users)
    assert users[-1].split(":")[0].isdigit(), "a numeric user, for Kubernetes' runAsNonRoot"
    # Nothing runs as root after the USER line, and no compiler comes into the image.
    after_user = run[[w for w, _ in run].index("USER"):]
    assert not any(w == "RUN" for w, _ in after_user)
    assert not any("gcc" in rest or "build-essential" in rest for _, rest in run)
    assert final["STOPSIGNAL"] == "SIGTERM"
    assert {"8000", "9100"} <= set(final["EXPOSE"].split())
    assert "/healthz" in final["HEALTHCHECK"] and "9100" in final["HEALTHCHECK"]
    assert json.loads(final["ENTRYPOINT"]) == ["fastlb"]


def test_dockerignore_keeps_what_the_build_copies():
    patterns = [line for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
                if line and not line.startswith("#")]
    assert patterns[0] == "*"
    kept = {p[1:] for p in patterns if p.startswith("!")}
    assert {"pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "src/**/*.pyx",
            "src/**/*.pxd", "src/**/*.pxi", "fastlb/"} <= kept


def healthcheck_command(admin_port: int) -> list:
    """The Dockerfile's HEALTHCHECK command, aimed at ``admin_port`` and this Python."""
    check = dict(stages(dockerfile_instructions(DEPLOY / "Dockerfile"))[-1])["HEALTHCHECK"]
    argv = json.loads(check[check.index("CMD") + 3:].strip())
    assert argv[0] == "python"
    return [sys.executable] + [arg.replace(":9100/", ":%d/" % admin_port) for arg in argv[1:]]


def vrrp_check_command(admin_port: int) -> list:
    """keepalived.conf's vrrp_script command, aimed at ``admin_port``."""
    text = (DEPLOY / "keepalived" / "keepalived.conf").read_text()
    script = re.search(r'vrrp_script chk_fastlb \{.*?\n\s*script "([^"]+)"', text, re.S).group(1)
    return shlex.split(script.replace(":9100/", ":%d/" % admin_port))


def test_docker_and_keepalived_health_commands_follow_fastlb_through_a_drain(procs, faults):
    """HEALTHCHECK fails once fastlb drains; keepalived's check holds until fastlb is gone."""
    if not shutil.which("curl"):
        pytest.fail("curl is needed for keepalived's check (.ci/run installs it)")
    slow = faults(request=DELAY, delay=4.0)
    admin = free_port()
    lb = procs.fastlb(slow.port, "--admin", admin, "--drain-timeout", "10")

    def check(argv) -> int:
        if argv[0] == "/usr/bin/curl" and not Path(argv[0]).exists():
            argv = [shutil.which("curl")] + argv[1:]
        return subprocess.run(argv, capture_output=True, timeout=20).returncode

    assert check(healthcheck_command(admin)) == 0
    assert check(vrrp_check_command(admin)) == 0
    # A client in flight keeps fastlb draining after SIGTERM.
    client = socket.create_connection(("127.0.0.1", lb.port), timeout=10)
    client.sendall(b"GET /slow HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    wait_until(lambda: slow.requests == 1, 10, message="the request at the slow backend")
    lb.signal(signal.SIGTERM)
    wait_until(lambda: admin_status(admin) == 503, 5, message="503 from /healthz")
    assert check(healthcheck_command(admin)) != 0, "docker should call a draining fastlb unhealthy"
    assert check(vrrp_check_command(admin)) == 0, "keepalived should keep the address while fastlb drains"
    client.settimeout(10)
    assert client.recv(12).startswith(b"HTTP/1.1 200")
    client.close()
    assert lb.wait(15) == 0
    assert check(healthcheck_command(admin)) != 0
    assert check(vrrp_check_command(admin)) != 0, "keepalived should move the address once fastlb is gone"


# -- Kubernetes --------------------------------------------------------------------

def manifests() -> dict[str, list[dict]]:
    """Every object in deploy/kubernetes, by kind."""
    found: dict[str, list[dict]] = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                assert {"apiVersion", "kind"} <= set(document), path.name
                found.setdefault(document["kind"], []).append(document)
    return found


def test_kustomization_lists_every_manifest():
    listed = yaml.safe_load((DEPLOY / "kubernetes" / "kustomization.yaml").read_text())["resources"]
    present = {p.name for p in (DEPLOY / "kubernetes").glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(listed) == sorted(present)


def test_kubernetes_configmap_is_a_valid_fastlb_config_over_the_headless_service(tmp_path):
    objects = manifests()
    (configmap,) = objects["ConfigMap"]
    config = config_from_toml(configmap["data"]["fastlb.toml"], tmp_path)
    namespace = configmap["metadata"]["namespace"]
    web = next(s for s in objects["Service"] if s["spec"].get("clusterIP") == "None")
    port_names = {p["name"]: p["port"] for p in web["spec"]["ports"]}
    (backend,) = config.backends
    # srv:_PORTNAME._tcp.SERVICE.NAMESPACE.svc.cluster.local: the headless Service's SRV records.
    match = re.fullmatch(r"srv:_(\w+)\._tcp\.([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local", backend.host)
    assert match, backend.host
    assert match.group(1) in port_names
    assert (match.group(2), match.group(3)) == (web["metadata"]["name"], namespace)
    assert config.resolve_interval > 0, "pods come and go: fastlb must look the name up again"
    # Every object lives in the namespace the name points at.
    for kind, items in objects.items():
        for item in items:
            if kind != "Kustomization":
                assert item["metadata"]["namespace"] == namespace, (kind, item["metadata"]["name"])


def test_kubernetes_deployment_probes_healthz_on_the_admin_port_and_outlasts_the_drain(tmp_path):
    objects = manifests()
    (configmap,) = objects["ConfigMap"]
    config = config_from_toml(configmap["data"]["fastlb.toml"], tmp_path)
    (deployment,) = objects["Deployment"]
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    admin_host, _, admin_port = config.admin.rpartition(":")
    # The kubelet probes the pod's address: the admin endpoint must not be loopback only.
    assert admin_host == "0.0.0.0" and ports["admin"] == int(admin_port)
    assert ports["traffic"] == config.port
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz"
        assert ports.get(get["port"], get["port"]) == int(admin_port)
    # A draining pod (503) is not killed by its liveness probe before the drain ends.
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > pod["terminationGracePeriodSeconds"]
    # preStop sleep, then SIGTERM and the drain, all before the kubelet's SIGKILL.
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert int(command[1]) + config.drain_timeout < pod["terminationGracePeriodSeconds"]
    assert container["args"] == ["--config", "/etc/fastlb/fastlb.toml"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/fastlb")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    # Resources and a locked-down container.
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    docker_user = dict(stages(dockerfile_instructions(DEPLOY / "Dockerfile"))[-1])["USER"]
    assert str(pod["securityContext"]["runAsUser"]) == docker_user.split(":")[0]


def test_kubernetes_service_and_budget_select_the_fastlb_pods():
    objects = manifests()
    (deployment,) = objects["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    front = next(s for s in objects["Service"] if s["metadata"]["name"] == "fastlb")
    assert front["spec"]["selector"].items() <= labels.items()
    container_ports = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert [p["targetPort"] for p in front["spec"]["ports"]] == ["traffic"]
    assert "traffic" in container_ports
    (budget,) = objects["PodDisruptionBudget"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["minAvailable"] == 1 < deployment["spec"]["replicas"]


# -- keepalived --------------------------------------------------------------------

def keepalived_blocks(text: str) -> dict[str, str]:
    """Top-level blocks ('vrrp_script chk_fastlb' -> body), checking that braces balance."""
    blocks, depth, head, body = {}, 0, "", []
    for line in text.splitlines():
        line = re.sub(r"^@\w+\s+", "", line.split("#", 1)[0].strip())
        if not line:
            continue
        opens, closes = line.count("{"), line.count("}")
        if depth == 0 and opens:
            head, body = line.split("{", 1)[0].strip(), []
        elif depth:
            body.append(line)
        depth += opens - closes
        assert depth >= 0, "a } without its {"
        if depth == 0 and head:
            blocks[head] = "\n".join(body)
            head = ""
    assert depth == 0, "a { without its }"
    return blocks


def test_keepalived_config_tracks_fastlb_healthz_on_both_hosts():
    text = (DEPLOY / "keepalived" / "keepalived.conf").read_text()
    blocks = keepalived_blocks(text)
    assert "/healthz" in blocks["vrrp_script chk_fastlb"]
    instance = blocks["vrrp_instance fastlb"]
    assert "chk_fastlb" in instance and "virtual_ipaddress" in instance
    assert "nopreempt" in instance and "state BACKUP" in instance
    priorities = dict(re.findall(r"^@(\w+) priority (\d+)$", text, re.M))
    assert set(priorities) == {"lb1", "lb2"} and len(set(priorities.values())) == 2


def test_keepalived_accepts_the_config_on_both_hosts(tmp_path):
    keepalived = shutil.which("keepalived", path=SBIN_PATH)
    if not keepalived:
        pytest.skip("keepalived is not installed (apt-get install keepalived); "
                    "the config is parsed by the test above")
    # The interface must exist on the machine that checks the file.
    interfaces = sorted(p.name for p in Path("/sys/class/net").iterdir() if p.name != "lo")
    if not interfaces:
        pytest.skip("no network interface but lo to check the config against")
    name = "eth0" if "eth0" in interfaces else interfaces[0]
    conf = tmp_path / "keepalived.conf"
    conf.write_text((DEPLOY / "keepalived" / "keepalived.conf").read_text().replace("eth0", name))
    for host in ("lb1", "lb2"):
        done = subprocess.run([keepalived, "--config-test", "-f", str(conf), "-i", host, "-l"],
                              capture_output=True, text=True, timeout=60)
        # keepalived 2.2 ends a passed test by sending itself SIGTERM.
        assert done.returncode in (0, -signal.SIGTERM), (host, done.returncode, done.stderr)
        assert not done.stderr.strip() and not done.stdout.strip(), (host, done.stdout, done.stderr)


# -- Grafana -----------------------------------------------------------------------

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# What the dashboard must show (the list).
REQUIRED_FAMILIES = {
    "fastlb_accepted_connections_total", "fastlb_inflight_connections", "fastlb_backend_up",
    "fastlb_backend_connections_total", "fastlb_backend_active_connections", "fastlb_backend_bytes_total",
    "fastlb_backend_responses_total", "fastlb_backend_connection_duration_seconds",
    "fastlb_backend_failures_total", "fastlb_backend_replays_total", "fastlb_bad_proxy_header_total",
    "fastlb_internal_errors_total", "fastlb_at_capacity", "fastlb_splice_pipes", "fastlb_no_backend_total",
}


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "fastlb.json").read_text())


def all_panels(panels: list) -> list:
    found = []
    for panel in panels:
        found.append(panel)
        found.extend(all_panels(panel.get("panels", [])))
    return found


def dashboard_queries() -> list[str]:
    board = dashboard()
    queries = [t["expr"] for p in all_panels(board["panels"]) for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def test_dashboard_is_well_formed():
    board = dashboard()
    panels = all_panels(board["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    names = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "instance", "backend"} <= names
    for panel in panels:
        position = panel["gridPos"]
        assert 0 <= position["x"] and position["x"] + position["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            for opening, closing in ("()", "{}", "[]"):
                assert expr.count(opening) == expr.count(closing), expr
            assert 'instance=~"$instance"' in expr, "%s: %s" % (panel["title"], expr)


def test_every_metric_the_dashboard_queries_is_in_a_real_metrics_page(procs, faults):
    backend = faults(body=b"hello\n")
    admin = free_port()
    lb = procs.fastlb(backend.port, "--admin", admin)
    with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert client.recv(12).startswith(b"HTTP/1.1 200")
    with socket.create_connection(("127.0.0.1", admin), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    families = list(text_string_to_metric_families(data.partition(b"\r\n\r\n")[2].decode()))
    samples = {sample.name for family in families for sample in family.samples}
    histograms = {family.name for family in families if family.type == "histogram"}

    used = set()
    for query in dashboard_queries():
        used.update(re.findall(r"\bfastlb_[a-z0-9_]+", query))
    missing = sorted(name for name in used if name not in samples)
    assert not missing, "the dashboard queries metrics fastlb does not export: %s" % missing
    # Histogram series count as their family.
    shown = {name for name in used}
    for name in used:
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix) and name[:-len(suffix)] in histograms:
                shown.add(name[:-len(suffix)])
    assert REQUIRED_FAMILIES <= shown, "not on the dashboard: %s" % sorted(REQUIRED_FAMILIES - shown)


# -- docs ----------------------------------------------------------------------------

def test_readme_links_the_deployment_guide():
    assert "docs/deploy.md" in (ROOT / "README.md").read_text()
    assert (ROOT / "docs" / "deploy.md").exists()
