"""The deployment files in ``deploy/``: checked with the real tools, and their command lines run for real.

There is no systemd as PID 1, no Docker engine and no Kubernetes cluster here, so each deployment's
exact command line is taken from the file as shipped (the unit's ``ExecStart=``, the Dockerfile's
``ENTRYPOINT`` + ``CMD``, a manifest's ``args``) and run as a real process, after one mapping:

* absolute paths of the target system that the file names (``/data/checkpoints``, ``/etc/ckpt-watcher``,
  ``/checkpoints``, ``/run/ckpt-watcher``, ...) are mapped to directories under the test's ``tmp_path``,
  by prefix, wherever they occur in an argument (``PathMap``);
* the program: ``/opt/ckpt-watcher/bin/ckpt-watcher`` (the unit) and ``ckpt-watcher`` (the image's
  ENTRYPOINT, its HEALTHCHECK and the manifests' probes) become this environment's console script
  beside ``sys.executable``. Every other program (``/usr/bin/test``, ``/bin/kill``) runs as is.

What the supervisor would add is reproduced too: systemd's ``NOTIFY_SOCKET`` (a socket of the test's
own), ``WATCHDOG_USEC`` from ``WatchdogSec=`` (as ``systemd-analyze timespan`` reads it) and
``WATCHDOG_PID``; the container runtime's PID namespace (the daemon is PID 1, via ``unshare``);
kubelet's ConfigMap volume layout (``..data`` symlinks) and its exec probes. What cannot be reproduced
is listed in the README's "Deploying" section: ``User=``/``runAsUser`` and the sandboxing itself.

Tools (``systemd-analyze``, ``hadolint``, ``kubernetes-validate``, ``unshare``) are required: a missing
one fails the test, it never skips (``.ci/run`` installs them).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from ckpt_watcher import health
from ckpt_watcher.cli import build_parser
from ckpt_watcher.locations import StorageURL
from ckpt_watcher.policy import load_policy
from tests.support.daemon import DaemonProcess, only_child, running_daemon, wait_until
from tests.support.factories import step_name, write_checkpoint, zip_bytes
from tests.support.metrics import metrics_port, scrape
from tests.support.notify_socket import NotifySocket
from tests.support.s3_server import Bucket, S3Server

pytestmark = pytest.mark.timeout(180)

REPOSITORY = Path(__file__).resolve().parents[2]
DEPLOY = REPOSITORY / "deploy"
UNIT = DEPLOY / "systemd" / "ckpt-watcher@.service"
UNIT_ENV = DEPLOY / "systemd" / "llada8b.env"
VERIFY_SCRIPT = DEPLOY / "systemd" / "verify"
DOCKERFILE = DEPLOY / "container" / "Dockerfile"
DOCKERIGNORE = DEPLOY / "container" / "Dockerfile.dockerignore"
POLICY = DEPLOY / "policy.yaml"
KUBERNETES = DEPLOY / "kubernetes"
CONFIGMAP = KUBERNETES / "policy-configmap.yaml"
MANIFESTS = (KUBERNETES / "sidecar-job.yaml", KUBERNETES / "shared-volume-deployment.yaml")
BUCKET_MANIFEST = KUBERNETES / "bucket-deployment.yaml"  # watches a bucket prefix: no volume of checkpoints
MINIMUM_KUBERNETES = "1.29.0"  # native sidecars (initContainers with restartPolicy: Always)

# The recommended policy keeps the newest 3 step checkpoints, and moves the others into its trash
# (deploy/policy.yaml).
SEEDED_STEPS = range(100, 900, 100)
KEPT_AT_START = {step_name(0, step) for step in (600, 700, 800)}

Document = dict[str, Any]


# -- shared helpers ---------------------------------------------------------------------------------


def _tool(name: str) -> str:
    """A tool of this environment (the venv's bin first, then PATH); missing is a failure, not a skip."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (.ci/run installs it; see the test extra in pyproject.toml)")
    return found


def _console_script() -> str:
    return _tool("ckpt-watcher")


@dataclass(frozen=True)
class PathMap:
    """Absolute paths of the target system -> temporary ones; programs -> this environment's."""

    paths: dict[str, Path]
    programs: dict[str, str] = field(default_factory=dict)

    def text(self, text: str) -> str:
        """Map every mapped path (or path below one) wherever it occurs in ``text``."""
        if not self.paths:
            return text
        prefixes = sorted(self.paths, key=len, reverse=True)
        pattern = re.compile(
            r"(?<![\w./-])(" + "|".join(re.escape(prefix) for prefix in prefixes) + r")(?=$|/|[^\w.-])"
        )
        return pattern.sub(lambda match: str(self.paths[match.group(1)]), text)

    def command(self, argv: Sequence[str]) -> list[str]:
        """The command line as it runs here: the program replaced, paths mapped in every argument."""
        program, *arguments = argv
        return [self.programs.get(program, self.text(program)), *(self.text(arg) for arg in arguments)]


def _names(directory: Path) -> set[str]:
    """The checkpoints in ``directory`` (not the watcher's own lock file or trash)."""
    return {
        path.name
        for path in directory.iterdir()
        if not path.name.startswith((".ckpt-watcher", ".ckpt-trash"))
    }


def _seed_old_checkpoints(directory: Path) -> None:
    """Checkpoints that accumulated while no watcher ran: complete, and older than any --settle."""
    directory.mkdir(parents=True, exist_ok=True)
    an_hour_ago = time.time() - 3600
    for step in SEEDED_STEPS:
        path = write_checkpoint(directory / step_name(0, step))
        os.utime(path, (an_hour_ago, an_hour_ago))


def _run(argv: Sequence[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def _parse_watch_command(arguments: Sequence[str]) -> Any:
    """Parse with the CLI's own parser; a command line it rejects fails the test with argparse's message."""
    try:
        return build_parser().parse_args(list(arguments))
    except SystemExit as exit_:
        pytest.fail(f"ckpt-watcher rejects {shlex.join(arguments)} (exit {exit_.code})")


def _probe_heartbeat(command: Sequence[str]) -> Path:
    """The heartbeat file a probe checks: it must be ``ckpt-watcher health`` (no ``python -c``, no
    shell), with options its parser accepts."""
    program, command_name, *arguments = command
    assert (program, command_name) == ("ckpt-watcher", "health"), f"not a health probe: {command}"
    parser = argparse.ArgumentParser()
    health.add_arguments(parser)
    heartbeat: Path = parser.parse_args(arguments).heartbeat
    return heartbeat


def _as_pid_1(command: Sequence[str]) -> list[str]:
    """Run ``command`` as PID 1 of a new PID namespace, as a container runtime does."""
    flags = ["--pid", "--fork", "--kill-child"]
    if os.geteuid() != 0:
        flags.append("--map-root-user")
    return [_tool("unshare"), *flags, *command]


def _stop_pid_1(daemon: DaemonProcess, timeout: float = 30.0) -> int:
    """SIGTERM to the namespace's PID 1 (as `docker stop` / kubelet do); its exit code.

    ``timeout`` is a deadline (the supervisor's grace period), not a measurement.
    """
    child = only_child(daemon.process.pid)
    os.kill(child, signal.SIGTERM)
    return daemon.process.wait(timeout=timeout)


# -- systemd ----------------------------------------------------------------------------------------


def _unit_directives(path: Path) -> dict[str, dict[str, list[str]]]:
    """``{section: {key: [values in order]}}``, with systemd's comments and line continuations."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = (pending + raw.strip()) if pending else raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: {line!r} before any section"
        key, separator, value = line.partition("=")
        assert separator, f"{path}: not a directive: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _one(directives: dict[str, list[str]], key: str) -> str:
    values = directives.get(key, [])
    assert len(values) == 1, f"expected exactly one {key}=, found {values}"
    return values[0]


def _specifiers(text: str, instance: str) -> str:
    """Expand the unit specifiers the shipped unit uses (%i, %%); any other one is refused loudly."""

    def expand(match: re.Match[str]) -> str:
        letter = match.group(1)
        if letter == "i":
            return instance
        if letter == "%":
            return "%"
        raise AssertionError(f"specifier %{letter} in {text!r}: teach this test what systemd does with it")

    return re.sub(r"%(.)", expand, text)


def _environment_file(path: Path) -> dict[str, str]:
    """systemd's EnvironmentFile= format as the shipped file uses it: KEY=value, # and ; comments."""
    values: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;" or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def _exec_line(line: str, environment: dict[str, str]) -> list[str]:
    """An Exec*= line with systemd's variable rules: ``${X}`` is one word, a lone ``$X`` splits into 0..n."""
    assert not re.match(r"^[-@:+!]", line), f"Exec prefixes are not handled here: {line!r}"
    words: list[str] = []
    for word in shlex.split(line):
        lone = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if lone:
            words.extend(shlex.split(environment.get(lone.group(1), "")))
            continue
        expanded = re.sub(
            r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda match: environment.get(match.group(1), ""), word
        )
        assert "$" not in expanded, f"unexpanded variable syntax in {word!r}"
        words.append(expanded)
    return words


def _timespan_microseconds(value: str) -> int:
    """A systemd time span in microseconds, as systemd itself parses it."""
    result = _run([_tool("systemd-analyze"), "timespan", value])
    assert result.returncode == 0, result.stderr
    match = re.search(r"μs:\s*(\d+)", result.stdout)
    assert match, result.stdout
    return int(match.group(1))


@dataclass
class InstalledUnit:
    """The unit's instance as the install steps in its header lay it out, under a temporary root."""

    instance: str
    service: dict[str, list[str]]
    unit: dict[str, list[str]]
    environment: dict[str, str]
    mapping: PathMap

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.environment["CHECKPOINT_DIR"])

    @property
    def policy_file(self) -> Path:
        return Path(self.environment["POLICY_FILE"])

    def commands(self, key: str, extra: dict[str, str] | None = None) -> list[list[str]]:
        environment = {**self.environment, **(extra or {})}
        return [
            self.mapping.command(_exec_line(_specifiers(line, self.instance), environment))
            for line in self.service.get(key, [])
        ]


def _install_unit(tmp_path: Path) -> InstalledUnit:
    """Follow the unit's install steps for the instance named by the shipped .env file."""
    sections = _unit_directives(UNIT)
    service = sections["Service"]
    instance = UNIT_ENV.stem
    mapping = PathMap(
        paths={
            "/etc/ckpt-watcher": tmp_path / "etc" / "ckpt-watcher",
            "/data/checkpoints": tmp_path / "data" / "checkpoints",
        },
        programs={"/opt/ckpt-watcher/bin/ckpt-watcher": _console_script()},
    )
    # install -D llada8b.env /etc/ckpt-watcher/llada8b.env, with its paths mapped like the unit's
    environment_file = Path(mapping.text(_specifiers(_one(service, "EnvironmentFile"), instance)))
    environment_file.parent.mkdir(parents=True)
    environment_file.write_text(mapping.text(UNIT_ENV.read_text()))
    environment: dict[str, str] = {}
    for assignment in service.get("Environment", []):
        for word in shlex.split(assignment):
            key, _, value = word.partition("=")
            environment[key] = value
    environment.update(_environment_file(environment_file))  # EnvironmentFile= overrides Environment=
    installed = InstalledUnit(instance, service, sections["Unit"], environment, mapping)
    # install ../policy.yaml /etc/ckpt-watcher/llada8b.yaml; install -d /data/checkpoints/llada8b
    shutil.copyfile(POLICY, installed.policy_file)
    _seed_old_checkpoints(installed.checkpoint_dir)
    return installed


def test_unit_passes_systemd_analyze_verify() -> None:
    result = _run([str(VERIFY_SCRIPT), str(UNIT)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def test_verify_script_fails_on_any_systemd_diagnostic(tmp_path: Path) -> None:
    """A misspelt directive is only a warning to systemd-analyze (exit 0); the script must fail on it."""
    broken = tmp_path / UNIT.name
    broken.write_text(UNIT.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict"))
    result = _run([str(VERIFY_SCRIPT), str(broken)])
    assert result.returncode != 0
    assert "Unknown key 'ProtectSytem'" in result.stderr


def test_unit_hardening_and_supervision_settings() -> None:
    """What the issue asks of the unit, read from the file (systemd-analyze checked their syntax)."""
    sections = _unit_directives(UNIT)
    service = sections["Service"]
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "Restart": "on-failure",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectHome": "yes",
        "RestrictAddressFamilies": "AF_UNIX",
        "CapabilityBoundingSet": "",
        "SystemCallFilter": "@system-service",
        "EnvironmentFile": "/etc/ckpt-watcher/%i.env",
        "ReadWritePaths": "/data/checkpoints/%i",
        "RestartPreventExitStatus": "2",
    }
    assert {key: _one(service, key) for key in expected} == expected
    assert _timespan_microseconds(_one(service, "WatchdogSec")) > 0
    assert _one(service, "User") not in {"root", "0"}
    assert _one(service, "Group")
    assert _one(sections["Unit"], "RequiresMountsFor") == _one(service, "ReadWritePaths")
    assert _one(sections["Install"], "WantedBy") == "multi-user.target"


def test_env_file_points_at_the_units_writable_directory(tmp_path: Path) -> None:
    """The one writable path (ReadWritePaths=, no variables allowed there) is the run's CHECKPOINT_DIR."""
    installed = _install_unit(tmp_path)
    read_write_paths = _one(installed.service, "ReadWritePaths")
    writable = installed.mapping.text(_specifiers(read_write_paths, installed.instance))
    assert installed.checkpoint_dir == Path(writable)
    assert installed.policy_file.parent == installed.mapping.paths["/etc/ckpt-watcher"]
    assert load_policy(installed.policy_file).policy.save_top_k_checkpoints == 3


def test_unit_exec_start_runs_under_a_notify_socket(tmp_path: Path) -> None:
    """ExecStartPre=, ExecStart= and ExecReload= exactly as systemd would run them for an instance."""
    installed = _install_unit(tmp_path)
    root = installed.checkpoint_dir
    for command in installed.commands("ExecStartPre"):
        result = _run(command)
        assert result.returncode == 0, f"{shlex.join(command)}: {result.stderr}"
    [start] = installed.commands("ExecStart")
    assert start[0] == _console_script()
    assert _parse_watch_command(start[1:]).command == "watch"

    watchdog_usec = _timespan_microseconds(_one(installed.service, "WatchdogSec"))
    notify = NotifySocket(tmp_path / "notify.sock")
    # systemd sets WATCHDOG_PID to the main process: the pid of this sh, which then execs the daemon.
    as_main_process = ["/bin/sh", "-c", 'WATCHDOG_PID=$$; export WATCHDOG_PID; exec "$@"', "ckpt-watcher"]
    environment = {
        **installed.environment,
        "NOTIFY_SOCKET": str(notify.path),
        "WATCHDOG_USEC": str(watchdog_usec),
    }
    try:
        with running_daemon([], tmp_path / "log", environment, [*as_main_process, *start]) as daemon:
            wait_until(lambda: "READY=1" in notify.lines(), what="READY=1")
            # READY=1 comes only after the start-up reconcile: the directory is already within policy.
            assert _names(root) == KEPT_AT_START
            assert len(daemon.events("checkpoint_trashed")) == 5  # the recommended policy has a trash
            wait_until(
                lambda: "WATCHDOG=1" in notify.lines()[notify.lines().index("READY=1") :],
                what="WATCHDOG=1 after READY=1",
            )
            assert any(line.startswith("STATUS=") and "trashed 5" in line for line in notify.lines())

            write_checkpoint(root / step_name(0, 900))
            daemon.wait_for("checkpoint_trashed", lambda record: record["path"].endswith(step_name(0, 600)))
            assert _names(root) == {step_name(0, step) for step in (700, 800, 900)}

            [reload] = installed.commands("ExecReload", {"MAINPID": str(daemon.process.pid)})
            assert reload == ["/bin/kill", "-HUP", str(daemon.process.pid)]
            assert _run(reload).returncode == 0
            daemon.wait_for("policy_unchanged")
            wait_until(lambda: "RELOADING=1" in notify.lines(), what="RELOADING=1")
            after_reload = notify.lines()[notify.lines().index("RELOADING=1") :]
            assert after_reload[1].startswith("MONOTONIC_USEC=")
            wait_until(lambda: "READY=1" in notify.lines()[notify.lines().index("RELOADING=1") :])

            stop_timeout = _timespan_microseconds(_one(installed.service, "TimeoutStopSec")) / 1e6
            assert daemon.stop(signal.SIGTERM, timeout=stop_timeout) == 0
            assert daemon.events("watch_stopped")
            wait_until(lambda: "STOPPING=1" in notify.lines(), what="STOPPING=1")
    finally:
        notify.close()


def _commented_block(path: Path, after: str) -> list[str]:
    """The indented example lines (``#   ...``) of the comment that follows ``after`` in ``path``."""
    lines = path.read_text().splitlines()
    start = next(index for index, line in enumerate(lines) if after in line)
    block: list[str] = []
    for line in lines[start + 1 :]:
        if not line.startswith("#"):
            break
        if line.startswith("#   "):
            block.append(line[len("#   ") :])
        elif block:
            break
    return block


def test_env_file_documents_metrics_and_the_unit_the_drop_in_it_needs(tmp_path: Path) -> None:
    """The env file's --metrics example parses; the unit's network drop-in for it passes verify and
    lets the service open the TCP socket the sandbox otherwise refuses."""
    [example] = _commented_block(UNIT_ENV, "Prometheus metrics at")
    key, _, options = example.partition("=")
    assert key == "WATCH_OPTIONS"
    metrics = _parse_watch_command(["watch", "/data", *shlex.split(options)]).metrics
    assert (metrics.host, metrics.port) == ("127.0.0.1", 9464)

    drop_in = _commented_block(UNIT, "The metrics endpoint")
    assert drop_in[0] == "[Service]"
    settings = dict(line.split("=", 1) for line in drop_in[1:])
    assert settings == {"PrivateNetwork": "no", "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6"}
    service = _unit_directives(UNIT)["Service"]
    assert _one(service, "PrivateNetwork") == "yes", "without the drop-in the service has no network"
    assert _one(service, "RestrictAddressFamilies") == "AF_UNIX"
    with_drop_in = tmp_path / UNIT.name  # systemd reads a drop-in's [Service] as if appended
    with_drop_in.write_text(UNIT.read_text() + "\n" + "\n".join(drop_in) + "\n")
    result = _run([str(VERIFY_SCRIPT), str(with_drop_in)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_unit_start_fails_when_the_checkpoint_dir_is_missing(tmp_path: Path) -> None:
    """ExecStartPre= refuses a CHECKPOINT_DIR that is not there (or not writable) before the daemon runs."""
    installed = _install_unit(tmp_path)
    shutil.rmtree(installed.checkpoint_dir)
    [check] = installed.commands("ExecStartPre")
    assert _run(check).returncode != 0


# -- container --------------------------------------------------------------------------------------


@dataclass
class Dockerfile:
    """The instructions of a single-stage Dockerfile, continuation lines joined, comments dropped."""

    instructions: list[tuple[str, str]]

    @classmethod
    def read(cls, path: Path) -> Dockerfile:
        instructions: list[tuple[str, str]] = []
        pending = ""
        for raw in path.read_text().splitlines():
            stripped = raw.strip()
            if stripped.startswith("#") or (not stripped and not pending):
                continue
            if stripped.endswith("\\"):
                pending += stripped[:-1] + " "
                continue
            line = pending + stripped
            pending = ""
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
        return cls(instructions)

    def all(self, keyword: str) -> list[str]:
        return [rest for name, rest in self.instructions if name == keyword]

    def exec_form(self, keyword: str) -> list[str]:
        """ENTRYPOINT/CMD as JSON (exec form): the program is PID 1 itself, no shell in between."""
        [rest] = self.all(keyword)[-1:]
        if keyword == "HEALTHCHECK":
            rest = rest[rest.index("CMD ") + len("CMD ") :]
        value = json.loads(rest)
        assert isinstance(value, list), f"{keyword} must be in exec form, got {rest}"
        return [str(item) for item in value]

    def args(self) -> dict[str, str]:
        defaults: dict[str, str] = {}
        for rest in self.all("ARG"):
            name, _, value = rest.partition("=")
            defaults[name] = value.strip('"')
        return defaults

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for rest in self.all("ENV"):
            for word in shlex.split(rest):
                key, _, value = word.partition("=")
                values[key] = value
        return values


CONTAINER_PATHS = ("/checkpoints", "/etc/ckpt-watcher", "/run/ckpt-watcher")


def _container_map(tmp_path: Path) -> PathMap:
    """The image's paths -> temporary ones, as volumes would provide them."""
    return PathMap(
        paths={path: tmp_path / "container" / path.strip("/") for path in CONTAINER_PATHS},
        programs={"ckpt-watcher": _console_script()},
    )


def test_dockerfile_passes_hadolint() -> None:
    result = _run([_tool("hadolint"), "--failure-threshold", "style", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def _installed_extras(run: str, **build_arguments: str) -> str:
    """The extras the Dockerfile's install step asks pip for, by running it with a stub pip."""
    command = run.removeprefix("--mount=type=bind,target=/src,rw").replace("\\\n", " ")
    command = command.replace("pip install --no-cache-dir", "echo").replace("&& ckpt-watcher --version", "")
    output = subprocess.run(
        ["sh", "-c", command],
        env={"PATH": os.environ["PATH"], **build_arguments},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return output.removeprefix("/src[").removesuffix("]")


def test_dockerfile_shape() -> None:
    """Slim Python base, non-root user from build args, torch optional, exec-form entry point."""
    dockerfile = Dockerfile.read(DOCKERFILE)
    [base] = dockerfile.all("FROM")
    assert re.fullmatch(r"python:3\.1[1-9]-slim-\w+", base), base
    arguments = dockerfile.args()
    assert {"UID", "GID"} <= arguments.keys()
    assert arguments["INSTALL_TORCH"] == "false"
    assert dockerfile.all("USER") == ["${UID}:${GID}"]
    assert dockerfile.exec_form("ENTRYPOINT") == ["ckpt-watcher"]
    assert (
        _probe_heartbeat(dockerfile.exec_form("HEALTHCHECK"))
        == _parse_watch_command(dockerfile.exec_form("CMD")).heartbeat
    )
    assert dockerfile.all("STOPSIGNAL") == ["SIGTERM"]
    pyproject = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())
    assert "torch" in pyproject["project"]["optional-dependencies"]
    optional = pyproject["project"]["optional-dependencies"]
    assert {"torch", "metrics"} <= optional.keys()
    install = [run for run in dockerfile.all("RUN") if '"/src[${extras}]"' in run]
    assert len(install) == 1, "one pip install of the package, with its extras"
    assert arguments["EXTRAS"] == ""
    assert _installed_extras(install[0], INSTALL_TORCH="false", EXTRAS="") == "metrics"
    assert _installed_extras(install[0], INSTALL_TORCH="true", EXTRAS="") == "metrics,torch"
    assert _installed_extras(install[0], INSTALL_TORCH="false", EXTRAS="s3") == "metrics,s3"
    assert _installed_extras(install[0], INSTALL_TORCH="true", EXTRAS="s3") == "metrics,torch,s3"
    assert dockerfile.all("EXPOSE") == ["9464"]


def test_build_context_allowed_by_dockerignore_builds_the_package(tmp_path: Path) -> None:
    """The files the .dockerignore lets into the build context are enough to build the package."""
    allowed = [line[1:].rstrip("/") for line in DOCKERIGNORE.read_text().splitlines() if line.startswith("!")]
    assert "*" in DOCKERIGNORE.read_text().splitlines()
    context = tmp_path / "context"
    for name in allowed:
        source = REPOSITORY / name
        if source.is_dir():
            shutil.copytree(source, context / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            context.mkdir(exist_ok=True)
            shutil.copyfile(source, context / name)
    wheels = tmp_path / "wheels"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels), "."],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=context,
    )
    assert result.returncode == 0, result.stderr
    assert list(wheels.glob("ckpt_watcher-*.whl"))


def test_container_command_starts_is_healthy_and_stops_on_sigterm_as_pid_1(tmp_path: Path) -> None:
    """ENTRYPOINT + CMD as the runtime runs them: PID 1, the image's ENV, volumes at the image's paths."""
    dockerfile = Dockerfile.read(DOCKERFILE)
    mapping = _container_map(tmp_path)
    command = mapping.command([*dockerfile.exec_form("ENTRYPOINT"), *dockerfile.exec_form("CMD")])
    health = mapping.command(dockerfile.exec_form("HEALTHCHECK"))
    # The volumes: the checkpoints, the policy (a ConfigMap in Kubernetes), the heartbeat's tmpfs.
    checkpoints, policy_dir, run_dir = (mapping.paths[path] for path in CONTAINER_PATHS)
    _seed_old_checkpoints(checkpoints)
    policy_dir.mkdir(parents=True)
    shutil.copyfile(POLICY, policy_dir / "policy.yaml")
    run_dir.mkdir(parents=True)

    assert _run(health).returncode == 1, "healthy before the daemon ever ran"
    daemon = DaemonProcess([], tmp_path / "log", dockerfile.env(), _as_pid_1(command))
    try:
        daemon.wait_ready()
        assert _names(checkpoints) == KEPT_AT_START
        heartbeat = run_dir / "heartbeat"
        wait_until(heartbeat.exists, what="the heartbeat file")
        result = _run(health)
        assert result.returncode == 0, result.stderr

        assert _stop_pid_1(daemon) == 0
        assert daemon.events("stop_requested")[0]["signal"] == "SIGTERM"
        assert daemon.events("watch_stopped")
    finally:
        daemon.close()
    stale = time.time() - 120
    os.utime(heartbeat, (stale, stale))
    assert _run(health).returncode == 1, "still healthy with a heartbeat two minutes old"


def test_container_without_a_policy_exits_2(tmp_path: Path) -> None:
    """No policy mounted: a clear error and exit 2, never a silent run on defaults."""
    dockerfile = Dockerfile.read(DOCKERFILE)
    mapping = _container_map(tmp_path)
    mapping.paths["/checkpoints"].mkdir(parents=True)
    command = mapping.command([*dockerfile.exec_form("ENTRYPOINT"), *dockerfile.exec_form("CMD")])
    result = _run(command, timeout=60)
    assert result.returncode == 2
    assert "no such file" in result.stderr


# -- Kubernetes -------------------------------------------------------------------------------------


def _documents(path: Path) -> list[Document]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def _of_kind(path: Path, kind: str) -> Document:
    [document] = [document for document in _documents(path) if document["kind"] == kind]
    return document


def _pod_spec(path: Path) -> Document:
    workload = next(document for document in _documents(path) if document["kind"] in {"Job", "Deployment"})
    spec: Document = workload["spec"]["template"]["spec"]
    return spec


def _watcher_container(path: Path) -> Document:
    spec = _pod_spec(path)
    containers = [*spec.get("initContainers", []), *spec["containers"]]
    found: list[Document] = [container for container in containers if container["name"] == "ckpt-watcher"]
    assert len(found) == 1, f"{path}: expected one container named ckpt-watcher"
    return found[0]


def _volumes(path: Path) -> dict[str, Document]:
    return {volume["name"]: volume for volume in _pod_spec(path)["volumes"]}


def _claim_of(path: Path) -> str:
    """The claim of the volume mounted at the watcher's checkpoint path."""
    mounts = {mount["mountPath"]: mount["name"] for mount in _watcher_container(path)["volumeMounts"]}
    return str(_volumes(path)[mounts["/checkpoints"]]["persistentVolumeClaim"]["claimName"])


_QUANTITY = re.compile(r"^\d+(\.\d+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$")


def _quantities(document: Any) -> Iterator[str]:
    """Every value under a ``resources`` or ``sizeLimit`` key (the schemas accept any string there)."""
    if isinstance(document, dict):
        for key, value in document.items():
            if key in {"requests", "limits"} and isinstance(value, dict):
                yield from (str(quantity) for quantity in value.values())
            elif key == "sizeLimit":
                yield str(value)
            else:
                yield from _quantities(value)
    elif isinstance(document, list):
        for item in document:
            yield from _quantities(item)


@pytest.mark.parametrize("version", [MINIMUM_KUBERNETES, "latest"])
def test_manifests_validate_against_the_kubernetes_schemas(version: str) -> None:
    """Offline, strict (unknown fields are errors), for every manifest and every document in it."""
    files = [str(path) for path in sorted(KUBERNETES.glob("*.yaml"))]
    assert len(files) == 4
    version_flag = [] if version == "latest" else ["--kubernetes-version", version]
    result = _run([_tool("kubernetes-validate"), "--strict", *version_flag, *files])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == sum(len(_documents(Path(file))) for file in files)


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda path: path.stem)
def test_manifest_quantities_are_well_formed(manifest: Path) -> None:
    quantities = list(_quantities(_documents(manifest)))
    assert quantities
    assert [quantity for quantity in quantities if not _QUANTITY.match(quantity)] == []


@pytest.mark.parametrize(
    "arguments",
    [
        pytest.param(_watcher_container(MANIFESTS[0])["args"], id="sidecar-job"),
        pytest.param(_watcher_container(MANIFESTS[1])["args"], id="shared-volume-deployment"),
        pytest.param(Dockerfile.read(DOCKERFILE).exec_form("CMD"), id="dockerfile-cmd"),
    ],
)
def test_container_args_are_accepted_by_the_cli_parser(arguments: list[str]) -> None:
    parsed = _parse_watch_command(arguments)
    assert parsed.command == "watch"
    assert parsed.path == Path("/checkpoints")
    assert parsed.policy == Path("/etc/ckpt-watcher/policy.yaml")
    assert parsed.heartbeat == Path("/run/ckpt-watcher/heartbeat")


@pytest.mark.parametrize("manifest", [*MANIFESTS, BUCKET_MANIFEST], ids=lambda path: path.stem)
def test_manifest_exposes_the_metrics_port_named_metrics_with_scrape_annotations(manifest: Path) -> None:
    watcher = _watcher_container(manifest)
    metrics = _parse_watch_command(watcher["args"]).metrics
    assert metrics is not None, "the watcher serves --metrics"
    assert metrics.host == "", "on every interface of the pod: Prometheus scrapes the pod's IP"
    [port] = [port for port in watcher["ports"] if port["name"] == "metrics"]
    assert port == {"name": "metrics", "containerPort": metrics.port, "protocol": "TCP"}
    workload = next(
        document for document in _documents(manifest) if document["kind"] in {"Job", "Deployment"}
    )
    annotations = workload["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(metrics.port),
        "prometheus.io/path": "/metrics",
    }


def test_shared_volume_deployment_polls_one_replica_read_write_many() -> None:
    manifest = MANIFESTS[1]
    parsed = _parse_watch_command(_watcher_container(manifest)["args"])
    assert parsed.poll == 15.0
    assert parsed.settle >= 30
    deployment = _of_kind(manifest, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    claim = _of_kind(manifest, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert _claim_of(manifest) == claim["metadata"]["name"]


def test_sidecar_is_native_and_the_job_shares_the_checkpoint_volume() -> None:
    manifest = MANIFESTS[0]
    spec = _pod_spec(manifest)
    watcher = _watcher_container(manifest)
    assert watcher in spec["initContainers"]
    assert watcher["restartPolicy"] == "Always"
    [trainer] = spec["containers"]
    claim = _of_kind(manifest, "PersistentVolumeClaim")
    assert _claim_of(manifest) == claim["metadata"]["name"]
    assert {"name": "checkpoints", "mountPath": "/checkpoints"} in trainer["volumeMounts"]


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda path: path.stem)
def test_watcher_container_security_probes_resources_and_mounts(manifest: Path) -> None:
    watcher = _watcher_container(manifest)
    security = watcher["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert _pod_spec(manifest)["securityContext"]["runAsNonRoot"] is True
    for probe in ("startupProbe", "livenessProbe"):
        assert (
            _probe_heartbeat(watcher[probe]["exec"]["command"])
            == _parse_watch_command(watcher["args"]).heartbeat
        )
    assert {"cpu", "memory"} <= watcher["resources"]["requests"].keys()
    assert {"cpu", "memory"} <= watcher["resources"]["limits"].keys()

    parsed = _parse_watch_command(watcher["args"])
    mounts = {mount["mountPath"]: mount for mount in watcher["volumeMounts"]}
    volumes = _volumes(manifest)
    policy_mount = mounts[str(parsed.policy.parent)]
    assert "subPath" not in policy_mount, "a subPath mount never sees ConfigMap edits"
    assert policy_mount["readOnly"] is True
    configmap = _of_kind(CONFIGMAP, "ConfigMap")
    assert volumes[policy_mount["name"]]["configMap"]["name"] == configmap["metadata"]["name"]
    assert parsed.policy.name in configmap["data"]
    heartbeat_mount = mounts[str(parsed.heartbeat.parent)]
    assert "emptyDir" in volumes[heartbeat_mount["name"]]
    assert "persistentVolumeClaim" in volumes[mounts[str(parsed.path)]["name"]]


def test_configmap_policy_is_the_recommended_policy_and_valid(tmp_path: Path) -> None:
    text = _of_kind(CONFIGMAP, "ConfigMap")["data"]["policy.yaml"]
    assert text == POLICY.read_text(), "policy-configmap.yaml and deploy/policy.yaml have drifted apart"
    copy = tmp_path / "policy.yaml"
    copy.write_text(text)
    loaded = load_policy(copy)
    assert not loaded.warnings
    assert loaded.policy.save_top_k_checkpoints == 3


class ConfigMapVolume:
    """A ConfigMap volume laid out as kubelet does: KEY -> ..data/KEY, ..data -> ..<timestamp>/."""

    def __init__(self, directory: Path, data: dict[str, str]) -> None:
        self.directory = directory
        self.generation = 0
        directory.mkdir(parents=True)
        self._current = self._write(data)
        os.symlink(self._current.name, directory / "..data")
        for key in data:
            os.symlink(f"..data/{key}", directory / key)

    def _write(self, data: dict[str, str]) -> Path:
        self.generation += 1
        version = self.directory / f"..2026_11_28_00_00_0{self.generation}.{self.generation}"
        version.mkdir()
        for key, value in data.items():
            (version / key).write_text(value)
        return version

    def update(self, data: dict[str, str]) -> None:
        """``kubectl edit configmap``, as it reaches the pod: an atomic swap of ``..data``."""
        previous, self._current = self._current, self._write(data)
        os.symlink(self._current.name, self.directory / "..data_tmp")
        os.replace(self.directory / "..data_tmp", self.directory / "..data")
        shutil.rmtree(previous)


def _free_metrics_port(command: list[str]) -> list[str]:
    """The command with ``--metrics PORT`` on a free loopback port instead (the pod's own network
    namespace is not reproduced: the manifest's port may be taken on this machine)."""
    position = command.index("--metrics") + 1
    return [*command[:position], "127.0.0.1:0", *command[position + 1 :]]


def _probe_passes(command: Sequence[str]) -> bool:
    return _run(command, timeout=30).returncode == 0


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda path: path.stem)
def test_manifest_container_runs_passes_its_probes_and_hot_reloads_the_configmap(
    manifest: Path, tmp_path: Path
) -> None:
    """The watcher container as kubelet runs it: image ENTRYPOINT + the manifest's args, as PID 1, with
    its volumes at their mount paths; then its probes, a ConfigMap edit and the stop."""
    watcher = _watcher_container(manifest)
    volumes = _volumes(manifest)
    mapping = PathMap(
        paths={mount["mountPath"]: tmp_path / "pod" / mount["name"] for mount in watcher["volumeMounts"]},
        programs={"ckpt-watcher": _console_script()},
    )
    data: dict[str, str] = dict(_of_kind(CONFIGMAP, "ConfigMap")["data"])
    for mount in watcher["volumeMounts"]:
        directory = mapping.paths[mount["mountPath"]]
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            configmap_volume = ConfigMapVolume(directory, data)
        elif "persistentVolumeClaim" in volume:
            _seed_old_checkpoints(directory)
            checkpoints = directory
        else:
            assert "emptyDir" in volume
            directory.mkdir(parents=True)
    dockerfile = Dockerfile.read(DOCKERFILE)
    command = _free_metrics_port(mapping.command([*dockerfile.exec_form("ENTRYPOINT"), *watcher["args"]]))
    startup = mapping.command(watcher["startupProbe"]["exec"]["command"])
    liveness = mapping.command(watcher["livenessProbe"]["exec"]["command"])

    assert not _probe_passes(startup), "the startup probe passes before the daemon ever ran"
    daemon = DaemonProcess([], tmp_path / "log", dockerfile.env(), _as_pid_1(command))
    try:
        wait_until(lambda: _probe_passes(startup), timeout=60, what="the startup probe to pass")
        # (the heartbeat is touched during the start-up pass too, after each deletion)
        daemon.wait_for("pass_completed")
        assert _names(checkpoints) == KEPT_AT_START
        assert _probe_passes(liveness)
        metrics = scrape(metrics_port(daemon))
        assert metrics.value("ckpt_watcher_deletions_total", kind="step") == len(SEEDED_STEPS) - len(
            KEPT_AT_START
        )

        edited = data["policy.yaml"].replace("save_top_k_checkpoints: 3", "save_top_k_checkpoints: 2")
        assert edited != data["policy.yaml"]
        configmap_volume.update({**data, "policy.yaml": edited})
        reloaded = daemon.wait_for("policy_reloaded")[0]
        assert reloaded["changes"] == {"save_top_k_checkpoints": {"old": 3, "new": 2}}
        wait_until(
            lambda: _names(checkpoints) == {step_name(0, 700), step_name(0, 800)},
            what="pruning to the edited policy",
        )

        # before kubelet's SIGKILL: the grace period is the deadline
        assert _stop_pid_1(daemon, timeout=_pod_spec(manifest)["terminationGracePeriodSeconds"]) == 0
        assert daemon.events("watch_stopped")
    finally:
        daemon.close()


# -- the bucket-watching Deployment ------------------------------------------------------------------


def test_bucket_deployment_watches_its_prefix_with_one_replica_and_no_volume_of_checkpoints() -> None:
    watcher = _watcher_container(BUCKET_MANIFEST)
    parsed = _parse_watch_command(watcher["args"])
    assert parsed.path == StorageURL("s3", "training-checkpoints", "llada8b")
    assert parsed.poll == 30.0
    deployment = _of_kind(BUCKET_MANIFEST, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert not any("persistentVolumeClaim" in volume for volume in _volumes(BUCKET_MANIFEST).values())
    assert [source["secretRef"]["name"] for source in watcher["envFrom"]] == ["ckpt-watcher-s3"]
    credentials = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
    assert not credentials & {item["name"] for item in watcher["env"]}  # only from the Secret
    security = watcher["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert _pod_spec(BUCKET_MANIFEST)["securityContext"]["runAsNonRoot"] is True
    mounts = {mount["mountPath"]: mount for mount in watcher["volumeMounts"]}
    policy_mount = mounts[str(parsed.policy.parent)]
    assert "subPath" not in policy_mount
    assert _volumes(BUCKET_MANIFEST)[policy_mount["name"]]["configMap"]["name"] == "ckpt-watcher-policy"
    assert "emptyDir" in _volumes(BUCKET_MANIFEST)[mounts[str(parsed.heartbeat.parent)]["name"]]
    for probe in ("startupProbe", "livenessProbe"):
        assert _probe_heartbeat(watcher[probe]["exec"]["command"]) == parsed.heartbeat
    assert "EXTRAS" in Dockerfile.read(DOCKERFILE).args()


def test_bucket_deployment_runs_against_a_real_s3_server(
    s3: Bucket, s3_server: S3Server, tmp_path: Path
) -> None:
    """The container as kubelet runs it (ENTRYPOINT + args as PID 1, the manifest's env, the Secret's
    variables from the test server's environment), against a bucket of the manifest's name on the test
    S3 server: probes, pruning to the policy, a ConfigMap edit, the stop (which releases the lease)."""
    watcher = _watcher_container(BUCKET_MANIFEST)
    url = _parse_watch_command(watcher["args"]).path
    bucket = Bucket(s3_server.endpoint, name=url.bucket).create()
    bucket.put_many({f"{url.prefix}/{step_name(0, step)}": _checkpoint_bytes(step) for step in SEEDED_STEPS})
    mapping = PathMap(
        paths={mount["mountPath"]: tmp_path / "pod" / mount["name"] for mount in watcher["volumeMounts"]},
        programs={"ckpt-watcher": _console_script(), "python": sys.executable},
    )
    data: dict[str, str] = dict(_of_kind(CONFIGMAP, "ConfigMap")["data"])
    for mount in watcher["volumeMounts"]:
        directory = mapping.paths[mount["mountPath"]]
        if "configMap" in _volumes(BUCKET_MANIFEST)[mount["name"]]:
            configmap_volume = ConfigMapVolume(directory, data)
        else:
            directory.mkdir(parents=True)
    dockerfile = Dockerfile.read(DOCKERFILE)
    command = _free_metrics_port(mapping.command([*dockerfile.exec_form("ENTRYPOINT"), *watcher["args"]]))
    startup = mapping.command(watcher["startupProbe"]["exec"]["command"])
    environment = {**dockerfile.env(), **{item["name"]: item["value"] for item in watcher["env"]}}

    def names() -> set[str]:  # the trash the ConfigMap's policy recommends is not the run's
        keys = {key.removeprefix(f"{url.prefix}/") for key in bucket.raw_keys()}
        return {key for key in keys if not key.startswith(".ckpt-trash/")}

    daemon = DaemonProcess([], tmp_path / "log", environment, _as_pid_1(command))
    try:
        wait_until(lambda: _probe_passes(startup), timeout=60, what="the startup probe to pass")
        # (the heartbeat is touched during the start-up pass too, after each deletion)
        daemon.wait_for("pass_completed")
        assert names() == KEPT_AT_START | {".ckpt-watcher.lease"}
        metrics = scrape(metrics_port(daemon))
        assert metrics.value("ckpt_watcher_checkpoints", kind="step") == len(KEPT_AT_START)
        assert metrics.value("ckpt_watcher_info", version="0.1.0", observer="listing") == 1
        assert metrics.value("ckpt_watcher_deletions_total", kind="step") == len(SEEDED_STEPS) - len(
            KEPT_AT_START
        )
        assert "ckpt_watcher_filesystem_free_bytes" not in metrics.names(), "a prefix has no file system"
        edited = data["policy.yaml"].replace("save_top_k_checkpoints: 3", "save_top_k_checkpoints: 2")
        configmap_volume.update({**data, "policy.yaml": edited})
        daemon.wait_for("policy_reloaded")
        wait_until(
            lambda: names() == {step_name(0, 700), step_name(0, 800), ".ckpt-watcher.lease"},
            what="pruning to the edited policy",
        )
        assert _stop_pid_1(daemon, timeout=_pod_spec(BUCKET_MANIFEST)["terminationGracePeriodSeconds"]) == 0
        assert names() == {step_name(0, 700), step_name(0, 800)}
    finally:
        daemon.close()
    trashed = {record["path"].rsplit("/", 1)[-1] for record in daemon.events("checkpoint_trashed")}
    assert trashed == {step_name(0, step) for step in SEEDED_STEPS} - {step_name(0, 700), step_name(0, 800)}


def _checkpoint_bytes(step: int) -> bytes:
    """A small complete checkpoint of its own (as ``_seed_old_checkpoints`` writes to disk)."""
    return zip_bytes(f"weights of step {step}".encode())
