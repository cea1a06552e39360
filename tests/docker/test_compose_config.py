"""Static checks of the container set-up: docker-compose.yml, the two Dockerfiles, .dockerignore and the
Orthanc config agree with each other and with the service's settings. No Docker engine needed.

Two optional checks use real tools when they are installed (``hadolint``; ``docker-compose config``, which
validates a compose file without an engine) and skip, saying why, when they are not.
"""

from __future__ import annotations

import ast
import json
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from service.config import CONFIG_ENV, Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILES = {"cpu": ROOT / "docker" / "Dockerfile", "gpu": ROOT / "docker" / "Dockerfile.gpu"}
ORTHANC_JSON = ROOT / "docker" / "orthanc.json"
ORTHANC_LUA = ROOT / "docker" / "orthanc-forward.lua"
TRIAGE_SERVICES = ("pacs-triage", "pacs-triage-gpu")
ENV_PREFIX = "PACS_TRIAGE_"
SECRET_WORDS = re.compile(r"TOKEN|PASSWORD|SECRET|_KEY\b|CREDENTIAL", re.IGNORECASE)
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")

# Values for the variables compose requires (${VAR:?...}) when a check needs a complete environment.
REQUIRED_SAMPLES = {
    "PACS_TRIAGE_AUTH__ADMIN_TOKENS": json.dumps([secrets.token_urlsafe(32)]),
    "ORTHANC_ADMIN_USER": "admin",
    "ORTHANC_ADMIN_PASSWORD": secrets.token_urlsafe(24),
    "POSTGRES_PASSWORD": secrets.token_urlsafe(24),
}


# --- readers -------------------------------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict), "docker-compose.yml must hold a mapping"
    return data


def service(name: str) -> dict[str, Any]:
    services = compose()["services"]
    assert name in services, f"docker-compose.yml has no service {name!r}"
    return dict(services[name])


@cache
def orthanc_config() -> dict[str, Any]:
    return dict(json.loads(ORTHANC_JSON.read_text(encoding="utf-8")))


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):  # the "KEY=value" list form
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error}; a required variable missing from env fails."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m["name"], m["op"], m["arg"]
        if name in env:
            return env[name]
        if op in (":-", "-"):
            return str(arg)
        if op in (":?", "?"):
            raise AssertionError(f"compose requires ${{{name}}}; add a sample to REQUIRED_SAMPLES")
        return ""

    return INTERPOLATION.sub(one, value)


def published(svc: dict[str, Any]) -> dict[int, str]:
    """Container port -> the host side ("127.0.0.1:8000" or "11112"), from the short port syntax."""
    ports: dict[int, str] = {}
    for entry in svc.get("ports", []):
        host, _, container = str(entry).rpartition(":")
        ports[int(container.split("/")[0])] = host
    return ports


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    return instructions


def dockerfile_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in dockerfile_instructions(path):
        if keyword == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def settings_env_names() -> set[str]:
    """Every environment variable Settings reads: PACS_TRIAGE_<FIELD> and PACS_TRIAGE_<GROUP>__<FIELD>."""
    names = {CONFIG_ENV}
    for name, field in Settings.model_fields.items():
        group = field.annotation
        if isinstance(group, type) and issubclass(group, BaseModel):
            names.update(f"{ENV_PREFIX}{name}__{sub}".upper() for sub in group.model_fields)
        else:
            names.add(f"{ENV_PREFIX}{name}".upper())
    return names


# --- compose --------------------------------------------------------------------------------------------


class TestCompose:
    def test_services_images_and_named_volumes(self) -> None:
        services = compose()["services"]
        assert {"pacs-triage", "pacs-triage-gpu", "orthanc"} <= set(services)
        assert str(service("orthanc")["image"]).startswith(("orthancteam/orthanc:", "jodogne/orthanc:"))
        declared = set(compose().get("volumes") or {})
        for name, svc in services.items():
            for volume in svc.get("volumes", []):
                source = str(volume).split(":")[0]
                if not source.startswith(("./", "/")):
                    assert source in declared, f"{name}: volume {source!r} is not a declared named volume"

    def test_scale_profile_runs_the_roles_on_one_postgres(self) -> None:
        roles = {}
        for name in ("triage-api", "triage-listener", "triage-worker"):
            svc = service(name)
            assert svc.get("profiles") == ["scale"], name
            command = svc["command"]
            roles[command[command.index("--role") + 1]] = name
            url = svc["environment"]["PACS_TRIAGE_STORE__DATABASE_URL"]
            assert url.startswith("postgresql+psycopg://") and "@postgres:5432/" in url, name
            assert "${POSTGRES_PASSWORD:?" in url  # the password comes from the environment only
        assert set(roles) == {"api", "listener", "worker"}
        assert service("triage-worker")["deploy"]["replicas"] >= 2
        assert service("postgres").get("profiles") == ["scale"]

    def test_gpu_profile_reserves_an_nvidia_gpu(self) -> None:
        gpu = service("pacs-triage-gpu")
        assert gpu.get("profiles") == ["gpu"]
        devices = gpu["deploy"]["resources"]["reservations"]["devices"]
        assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
        assert "profiles" not in service("pacs-triage"), "the CPU service starts by default"
        # The GPU service answers to the name Orthanc's "triage" modality uses.
        assert "pacs-triage" in gpu["networks"]["default"]["aliases"]

    @pytest.mark.parametrize("name", ["pacs-triage", "pacs-triage-gpu"])
    def test_build_files_exist(self, name: str) -> None:
        build = service(name)["build"]
        context = ROOT / build.get("context", ".")
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.resolve() in {p.resolve() for p in DOCKERFILES.values()}
        assert dockerfile.is_file()

    def test_bind_mounts_exist_and_are_read_only(self) -> None:
        mounts = [str(v) for v in service("orthanc")["volumes"] if str(v).startswith("./")]
        targets = {}
        for mount in mounts:
            source, target, *mode = mount.split(":")
            assert (ROOT / source).is_file(), f"{source} does not exist"
            assert mode == ["ro"], f"{mount}: configuration is mounted read-only"
            targets[(ROOT / source).resolve()] = target
        assert targets[ORTHANC_JSON.resolve()] == "/etc/orthanc/orthanc.json"
        # The Lua is mounted where orthanc.json says it is.
        assert orthanc_config()["LuaScripts"] == [targets[ORTHANC_LUA.resolve()]]

    @pytest.mark.parametrize("name", TRIAGE_SERVICES)
    def test_environment_names_are_settings(self, name: str) -> None:
        known = settings_env_names()
        env = environment(service(name))
        unknown = sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in known)
        assert not unknown, f"{name}: not settings of service.config.Settings: {unknown}"
        referenced = {m["name"] for v in env.values() for m in INTERPOLATION.finditer(v)}
        unknown = sorted(k for k in referenced if k.startswith(ENV_PREFIX) and k not in known)
        assert not unknown, f"{name}: interpolates unknown settings: {unknown}"

    @pytest.mark.parametrize(("name", "dockerfile"), [("pacs-triage", "cpu"), ("pacs-triage-gpu", "gpu")])
    def test_container_settings_validate_and_match_ports(
        self, name: str, dockerfile: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The container's whole environment (image ENV, then compose) builds valid Settings."""
        import os

        for key in list(os.environ):
            if key.startswith(ENV_PREFIX):
                monkeypatch.delenv(key)
        env = dockerfile_env(DOCKERFILES[dockerfile])
        env.update({k: interpolate(v, REQUIRED_SAMPLES) for k, v in environment(service(name)).items()})
        for key, value in env.items():
            if key.startswith(ENV_PREFIX):
                monkeypatch.setenv(key, value)
        settings = Settings()
        assert not settings.auth.open, "the compose service must require tokens"
        assert settings.auth.admin_tokens, "admin tokens come from the host environment"
        assert settings.dicom.host == "0.0.0.0"
        ports = published(service(name))
        assert set(ports) == {settings.api.port, settings.dicom.port} == {8000, 11112}
        assert ports[settings.api.port].startswith("127.0.0.1:"), "the HTTP API is published on loopback"
        (destination,) = settings.delivery.destinations
        pacs = orthanc_config()
        assert destination == f"{pacs['DicomAet']}@orthanc:{pacs['DicomPort']}"
        assert settings.dicom.allowed_calling_aets in ([], [pacs["DicomAet"]])

    def test_orthanc_triage_modality_is_our_listener(self) -> None:
        defaults = Settings()
        aet, host, port = orthanc_config()["DicomModalities"]["triage"]
        assert (aet, host, port) == (defaults.dicom.ae_title, "pacs-triage", defaults.dicom.port)
        env = environment(service("pacs-triage"))
        assert env.get("PACS_TRIAGE_DICOM__AE_TITLE", aet) == aet
        assert int(env.get("PACS_TRIAGE_DICOM__PORT", port)) == port

    def test_orthanc_ports_match_its_config(self) -> None:
        pacs = orthanc_config()
        ports = published(service("orthanc"))
        assert set(ports) == {pacs["HttpPort"], pacs["DicomPort"]}
        assert all(host.startswith("127.0.0.1:") for host in ports.values())

    def test_no_secret_literals(self) -> None:
        """Secret-looking settings come from the host environment, never from the file."""
        for name, svc in compose()["services"].items():
            for key, value in environment(svc).items():
                if not SECRET_WORDS.search(key):
                    continue
                m = INTERPOLATION.fullmatch(value.strip())
                assert m, f"{name}: {key} must be ${{...}} from the host environment, not a literal"
                assert m["op"] in (None, ":?", "?") or m["arg"] in ("", "[]"), (
                    f"{name}: {key} has a default value; a secret must have none"
                )
        users = orthanc_config()["RegisteredUsers"]
        assert all(INTERPOLATION.fullmatch(k) and INTERPOLATION.fullmatch(v) for k, v in users.items())


# --- Orthanc --------------------------------------------------------------------------------------------


class TestOrthancConfig:
    def test_authentication_from_the_environment(self) -> None:
        pacs = orthanc_config()
        assert pacs["AuthenticationEnabled"] is True
        # Orthanc substitutes ${VAR} in the text before parsing it; an unset variable becomes "" (an empty
        # user with an empty password!), so compose must refuse to start without them.
        for ref in INTERPOLATION.finditer(json.dumps(pacs["RegisteredUsers"])):
            value = environment(service("orthanc"))[ref["name"]]
            m = INTERPOLATION.fullmatch(value)
            assert m and m["name"] == ref["name"] and m["op"] in (":?", "?"), value

    def test_lua_skips_our_results_and_sends_to_triage(self) -> None:
        lua = ORTHANC_LUA.read_text(encoding="utf-8")
        assert "function OnStoredInstance(instanceId, tags, metadata, origin)" in lua
        assert "tags['Manufacturer'] == OWN_MANUFACTURER" in lua
        from service.store.validate import OWN_MANUFACTURER

        assert f"local OWN_MANUFACTURER = '{OWN_MANUFACTURER}'" in lua
        assert "SendToModality(instanceId, TRIAGE)" in lua and "local TRIAGE = 'triage'" in lua
        assert "triage" in orthanc_config()["DicomModalities"]


# --- Dockerfiles ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
class TestDockerfile:
    def test_runs_as_a_non_root_user(self, kind: str) -> None:
        users = [args for keyword, args in dockerfile_instructions(DOCKERFILES[kind]) if keyword == "USER"]
        assert users, "no USER: the container would run as root"
        user = users[-1].split(":")[0]
        assert user not in ("root", "0"), f"USER {users[-1]} is root"

    def test_healthcheck_asks_readiness_with_python(self, kind: str) -> None:
        checks = [
            args for keyword, args in dockerfile_instructions(DOCKERFILES[kind]) if keyword == "HEALTHCHECK"
        ]
        assert len(checks) == 1
        assert "/healthz/ready" in checks[0] and '"python"' in checks[0] and "curl" not in checks[0]

    def test_ports_command_volume_and_settings(self, kind: str) -> None:
        instructions = dockerfile_instructions(DOCKERFILES[kind])
        by_keyword: dict[str, list[str]] = {}
        for keyword, args in instructions:
            by_keyword.setdefault(keyword, []).append(args)
        defaults = Settings()
        exposed = {int(p) for args in by_keyword["EXPOSE"] for p in args.split()}
        assert exposed == {defaults.api.port, defaults.dicom.port}
        assert json.loads(by_keyword["CMD"][-1]) == ["pacs-triage", "serve", "--host", "0.0.0.0"]
        env = dockerfile_env(DOCKERFILES[kind])
        assert env["PACS_TRIAGE_DICOM__HOST"] == "0.0.0.0"
        assert env["PACS_TRIAGE_DATA_DIR"] == "/var/lib/pacs-triage"
        assert json.loads(by_keyword["VOLUME"][-1]) == ["/var/lib/pacs-triage"]
        unknown = sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in settings_env_names())
        assert not unknown, unknown
        assert env["PACS_TRIAGE_INFERENCE__PROVIDERS"] == {"cpu": "cpu", "gpu": "cuda"}[kind]
        # Runtime dependencies only, from the hashed lock of this kind; the project itself without
        # dependencies (all came from the lock); no extras ("pip install .[train]") and no torch.
        runs = " ".join(by_keyword["RUN"])
        lock = f"requirements/{kind}.lock"
        assert re.search(rf"pip install [^&]*--require-hashes --no-deps -r {re.escape(lock)}", runs), runs
        assert re.search(r"pip install [^&]*--no-deps --no-build-isolation \.( |$)", runs), runs
        assert "torch" not in runs and ".[" not in runs
        copied = [a for k, a in instructions if k == "COPY" and lock in a]
        assert copied, f"{lock} is not copied into the build stage"

    def test_base_image(self, kind: str) -> None:
        args = [a for k, a in dockerfile_instructions(DOCKERFILES[kind]) if k == "ARG" and "IMAGE=" in a]
        (image,) = {a.split("=", 1)[1] for a in args}
        if kind == "cpu":
            assert image.startswith("python:3.11-slim")
        else:  # onnxruntime-gpu 1.31 needs CUDA 13 and cuDNN 9 (shared/PEERS.md)
            assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", image), image

    def test_copied_paths_exist_and_pass_dockerignore(self, kind: str) -> None:
        for keyword, args in dockerfile_instructions(DOCKERFILES[kind]):
            if keyword != "COPY" or args.startswith("--from"):
                continue
            *sources, _target = shlex.split(args)
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: missing"
                files = [ROOT / source] if (ROOT / source).is_file() else sorted((ROOT / source).rglob("*"))
                relative = [f.relative_to(ROOT).as_posix() for f in files if f.is_file()]
                sent = [r for r in relative if not dockerignored(r)]
                assert sent, f"COPY {source}: everything is excluded by .dockerignore"


# --- .dockerignore and the image's dependencies ------------------------------------------------------------


@cache
def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(exclude?, regex) in file order; the last matching rule wins, as Docker's."""
    rules = []
    for raw in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = "".join(
            ".*" if part == "**" else re.escape(part).replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
            for part in re.split(r"(\*\*)", pattern)
        )
        rules.append((not include, re.compile(regex.replace(".*/", "(?:.*/)?"))))
    return rules


def dockerignored(relpath: str) -> bool:
    """Whether Docker leaves the file out of the build context (a rule on a folder covers its files)."""
    path = PurePosixPath(relpath)
    candidates = [path.as_posix()] + [p.as_posix() for p in path.parents if p.as_posix() != "."]
    excluded = False
    for exclude, regex in dockerignore_rules():
        if any(regex.fullmatch(c) for c in candidates):
            excluded = exclude
    return excluded


def test_dockerignore_sends_the_build_inputs_only() -> None:
    for needed in (
        "pyproject.toml",
        "requirements/cpu.lock",
        "requirements/gpu.lock",
        "README.md",
        "service/app.py",
        "service/routing_rules.yaml",
        "training/__init__.py",
        "models/cxr-pneumothorax/model.onnx",
        "models/cxr-pneumothorax/card.json",
    ):
        assert not dockerignored(needed), f"{needed} must reach the build"
    for kept_out in (
        ".venv/bin/python",
        ".git/HEAD",
        "data/x.dcm",
        "var/pacs-triage.db",
        "tests/conftest.py",
        "service/__pycache__/app.cpython-311.pyc",
        "docker-compose.yml",
    ):
        assert dockerignored(kept_out), f"{kept_out} must stay out of the build context"


def _third_party_imports(package: Path) -> set[str]:
    """Top-level modules imported anywhere in the package, typing-only imports excepted."""

    class Visitor(ast.NodeVisitor):
        def __init__(self) -> None:
            self.found: set[str] = set()

        def visit_If(self, node: ast.If) -> None:
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                for child in node.orelse:
                    self.visit(child)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            self.found.update(alias.name.split(".")[0] for alias in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level == 0 and node.module:
                self.found.add(node.module.split(".")[0])

    visitor = Visitor()
    for path in package.rglob("*.py"):
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    first_party = {"service", "training"}
    return {m for m in visitor.found if m not in sys.stdlib_module_names and m not in first_party}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _normalise(re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0])


def _with_transitive(declared: set[str]) -> set[str]:
    """The declared distributions and what they require in turn (extras left out): ``from starlette
    import ...`` is covered by fastapi, which requires starlette."""
    seen: set[str] = set()
    todo = list(declared)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo.extend(_requirement_name(r) for r in requirements if "extra ==" not in r.replace('"', "'"))
    return seen


def test_runtime_dependencies_cover_what_the_service_imports() -> None:
    """The images ``pip install .`` (runtime dependencies only): each module service/ imports must come
    from a distribution listed in [project].dependencies, or the container fails at start-up."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = _with_transitive({_requirement_name(d) for d in project["dependencies"]})
    if "onnxruntime" in declared:  # the gpu extra's onnxruntime-gpu installs the same package in its place
        declared.add("onnxruntime-gpu")
    providers = metadata.packages_distributions()
    missing = {}
    for module in sorted(_third_party_imports(ROOT / "service")):
        dists = {_normalise(d) for d in providers.get(module, [])}
        if not dists & declared:
            missing[module] = sorted(dists) or ["(not installed)"]
    assert not missing, f"service/ imports modules from distributions missing in pyproject.toml: {missing}"


# --- real tools, when installed -----------------------------------------------------------------------------


def _tool(*names: str) -> str:
    for name in names:
        found = shutil.which(name) or (name if Path(name).is_file() else None)
        if found:
            return found
    pytest.skip(f"{names[0]} is not installed (scripts/install-peers installs it)")


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint(kind: str) -> None:
    hadolint = _tool("hadolint", str(Path(sys.executable).with_name("hadolint")))
    run = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILES[kind])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_docker_compose_config() -> None:
    """The compose file is valid for compose itself, and refuses to start without the secrets."""
    compose_bin = _tool("docker-compose", "/usr/libexec/docker/cli-plugins/docker-compose")
    base = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    cmd = [compose_bin, "-f", str(COMPOSE), "--project-directory", str(ROOT)]
    ok = subprocess.run(
        [*cmd, "--profile", "gpu", "--profile", "scale", "config", "--services"],
        capture_output=True,
        text=True,
        env={**base, **REQUIRED_SAMPLES},
        timeout=60,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert set(ok.stdout.split()) == {
        "pacs-triage",
        "pacs-triage-gpu",
        "orthanc",
        "triage-api",
        "triage-listener",
        "triage-worker",
        "postgres",
    }
    refused = subprocess.run(
        [*cmd, "config", "--quiet"], capture_output=True, text=True, env=base, timeout=60, check=False
    )
    assert refused.returncode != 0 and "PACS_TRIAGE_AUTH__ADMIN_TOKENS" in refused.stdout + refused.stderr
