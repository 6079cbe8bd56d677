"""Tests for launch_tpu.sh, run against a fake `gcloud` / `gsutil` placed first on PATH.

The fake appends one JSON line per call ({"prog": ..., "argv": [...]}) to calls.jsonl in a
state directory and answers from files there:
  state          the TPU's state ("READY", or several words: each describe pops the first one
                 until one is left); absent = NOT_FOUND.  create writes FAKE_CREATE_STATES
                 (comma separated; default READY, or ACTIVE for queued resources; groups
                 separated by ';' are used by successive creates), delete removes the file.
  markers/NAME   objects in the workdir (`gcloud storage ls .../NAME` succeeds when present;
                 `gcloud storage cp FILE gs://.../NAME` creates, `storage rm` removes).
FAKE_DONE_AFTER_RUN=1 makes an ssh that starts the trainer create markers/DONE.
FAKE_SSH_EXEC=1 makes every ssh execute its --command locally with bash, as a worker would: a
real end-to-end run of the remote scripts against fakes of what a TPU VM has (`python3` 3.10
with pip, `curl` for the metadata server, `git`, and the `uv` that setup installs, whose
virtualenv python runs a fake trainer).  FAKE_WORKERS=N runs it once per worker, each with its
own HOME (state/workers/w<i>), which `delete` wipes (a recreated VM has an empty disk) after
killing the trainers.  The fakes log to state/remote.jsonl; `git ls-remote` on the launching
machine answers FAKE_LS_REMOTE_SHAS (comma separated, one per call, the last repeated).
"""

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch_tpu.sh"

FAKE_GCLOUD = r"""#!{python} -S
import json, os, pathlib, shutil, signal, subprocess, sys, tarfile

prog = os.path.basename(sys.argv[0])
argv = sys.argv[1:]
root = pathlib.Path(os.environ["FAKE_STATE"])
markers = root / "markers"
markers.mkdir(exist_ok=True)
entry = {{"prog": prog, "argv": argv}}


def opt(name):
    for a in argv:
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def log():
    with open(root / "calls.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")


def worker_homes():
    n = int(os.environ.get("FAKE_WORKERS", "0"))
    if not n:
        return [(0, os.environ["HOME"])]
    return [(i, str(root / "workers" / f"w{{i}}")) for i in range(n)]


def counter(name):
    f = root / name
    k = int(f.read_text()) if f.exists() else 0
    f.write_text(str(k + 1))
    return k


rc = 0
if prog == "gcloud" and argv[:2] == ["compute", "tpus"] and len(argv) > 3:
    kind, verb = argv[2], argv[3]
    sfile = root / "state"
    if verb == "describe":
        if not sfile.exists():
            sys.stderr.write(
                "ERROR: (gcloud.compute.tpus.%s.describe) NOT_FOUND: Resource '%s' was not found\n"
                % (kind, argv[4]))
            rc = 1
        else:
            states = sfile.read_text().split()
            if len(states) > 1:
                sfile.write_text(" ".join(states[1:]))
            print(states[0])
    elif verb == "create":
        default = "ACTIVE" if kind == "queued-resources" else "READY"
        if os.environ.get("FAKE_CREATE_FAIL") == "1":
            sys.stderr.write("ERROR: RESOURCE_EXHAUSTED\n")
            rc = 1
        else:
            groups = os.environ.get("FAKE_CREATE_STATES", default).split(";")
            states = groups[min(counter("creates"), len(groups) - 1)]
            sfile.write_text(" ".join(states.split(",")))
    elif verb == "delete":
        if sfile.exists():
            sfile.unlink()
        if os.environ.get("FAKE_WORKERS"):   # the VMs go away: their processes and disks
            for _, home in worker_homes():
                pid = pathlib.Path(home) / "rlcsd_logs" / "train.pid"
                if pid.exists():
                    try:
                        os.killpg(int(pid.read_text()), signal.SIGKILL)
                    except OSError:
                        pass
            shutil.rmtree(root / "workers", ignore_errors=True)
            (root / "hold_trainer").unlink(missing_ok=True)
    elif verb == "scp":
        for a in argv[4:]:
            if a.endswith(".tar.gz") and os.path.exists(a):
                with tarfile.open(a) as t:
                    entry["tar_members"] = sorted(t.getnames())
                if os.environ.get("FAKE_SSH_EXEC") == "1":
                    for _, home in worker_homes():
                        os.makedirs(home, exist_ok=True)
                        shutil.copy(a, os.path.join(home, "rlcsd_src.tar.gz"))
    elif verb == "ssh":
        cmd = opt("--command")
        if cmd is not None and "rlcsd_jax.train" in cmd:
            if os.environ.get("FAKE_DONE_AFTER_RUN") == "1":
                (markers / "DONE").touch()
        if cmd is not None and os.environ.get("FAKE_SSH_EXEC") == "1":
            log()
            for i, home in worker_homes():
                os.makedirs(home, exist_ok=True)
                env = dict(os.environ, HOME=home, FAKE_WORKER_ID=str(i),
                           PATH=os.environ["FAKE_REMOTE_BIN"] + os.pathsep + os.environ["PATH"])
                rc = rc or subprocess.run(["bash", "-c", cmd], env=env, cwd=home).returncode
            sys.exit(rc)
elif prog == "gcloud" and argv[:2] == ["storage", "ls"]:
    name = argv[2].rstrip("/").rsplit("/", 1)[1]
    if (markers / name).exists():
        print(argv[2])
    else:
        sys.stderr.write("ERROR: One or more URLs matched no objects.\n")
        rc = 1
elif prog == "gcloud" and argv[:3] == ["storage", "cp", "-r"]:   # a folder to a worker's disk
    os.makedirs(argv[4], exist_ok=True)
    pathlib.Path(argv[4], "FAKE_COPY").write_text(argv[3])
elif prog == "gcloud" and argv[:2] == ["storage", "cp"] and argv[-1].startswith("gs://"):
    (markers / argv[-1].rsplit("/", 1)[1]).write_text(open(argv[2]).read())
elif prog == "gcloud" and argv[:2] == ["storage", "rm"]:
    for a in argv[2:]:
        if a.startswith("gs://"):
            p = markers / a.rsplit("/", 1)[1]
            if p.exists():
                p.unlink()
            else:
                rc = 1
log()
sys.exit(rc)
"""

# git on the launching machine (ls-remote) and on the workers (clone into a fake checkout with
# the repository's constraints file); anything else goes to the real git.
FAKE_GIT = r"""#!{python} -S
import json, os, pathlib, shutil, sys

argv = sys.argv[1:]
root = pathlib.Path(os.environ["FAKE_STATE"])


def remote_log(**kw):
    with open(root / "remote.jsonl", "a") as f:
        f.write(json.dumps(dict(worker=os.environ.get("FAKE_WORKER_ID"), **kw)) + "\n")


if argv[:1] == ["ls-remote"]:
    shas = os.environ["FAKE_LS_REMOTE_SHAS"].split(",")
    f = root / "ls_remote_calls"
    k = int(f.read_text()) if f.exists() else 0
    f.write_text(str(k + 1))
    ref = argv[2] if argv[2] == "HEAD" else "refs/heads/" + argv[2]
    print(shas[min(k, len(shas) - 1)] + "\t" + ref)
    sys.exit(0)
if argv[:1] == ["clone"]:
    dest = pathlib.Path(argv[2])
    (dest / ".git").mkdir(parents=True, exist_ok=True)
    (dest / "constraints").mkdir(exist_ok=True)
    shutil.copy({constraints!r}, dest / "constraints" / "tpu.txt")
    remote_log(prog="git", argv=argv)
    sys.exit(0)
if argv[:1] == ["-C"] and (pathlib.Path(argv[1]) / ".git").is_dir() and not (
        pathlib.Path(argv[1]) / ".git" / "HEAD").exists():
    remote_log(prog="git", argv=argv[2:])
    sys.exit(1 if argv[2] == "cat-file" else 0)   # the commit arrives with the 2nd fetch
os.execv({git!r}, ["git"] + argv)
"""

# The TPU image's python3 (3.10): only `pip install --user uv==V`, which installs FAKE_UV.
FAKE_IMAGE_PYTHON = r"""#!/bin/sh
if [ "$1 $2 $3 $4" = "-m pip install --user" ]; then
  mkdir -p "$HOME/.local/bin"
  cp "$(dirname "$0")/uv" "$HOME/.local/bin/uv"
  echo "{{\"worker\": \"$FAKE_WORKER_ID\", \"prog\": \"python3\", \"argv\": \"$*\"}}" >> "$FAKE_STATE/remote.jsonl"
  exit 0
fi
echo "fake image python3 (3.10): unexpected $*" >&2
exit 3
"""

# uv: `venv` makes a virtualenv whose python is the real (>= 3.11) interpreter, except that
# `-m rlcsd_jax.train` runs the fake trainer; `pip install` records its arguments.
FAKE_UV = r"""#!{python} -S
import json, os, pathlib, stat, sys

argv = sys.argv[1:]
with open(os.path.join(os.environ["FAKE_STATE"], "remote.jsonl"), "a") as f:
    f.write(json.dumps(dict(worker=os.environ.get("FAKE_WORKER_ID"), prog="uv", argv=argv,
                            cwd=os.getcwd(), home=os.environ["HOME"])) + "\n")
if argv == ["--version"]:
    print("uv {uv_version}")
elif argv[:1] == ["venv"]:
    py = pathlib.Path(argv[-1]) / "bin" / "python"
    py.parent.mkdir(parents=True, exist_ok=True)
    py.write_text({venv_python!r})
    py.chmod(py.stat().st_mode | stat.S_IXUSR)
elif argv[:2] == ["pip", "install"] and "-c" in argv:
    if not os.path.exists(argv[argv.index("-c") + 1]):
        sys.exit("uv: constraints file not found")
"""

VENV_PYTHON = """#!/bin/sh
if [ "$1 $2" = "-m rlcsd_jax.train" ]; then
  {{ printf '%s\\n' "$@"; echo "RLCSD_DISTRIBUTED=$RLCSD_DISTRIBUTED"; echo "EXTRA_ENV=$EXTRA_ENV"; \\
    echo "PWD=$PWD"; echo "PY=$0"; echo "VERSION=$({python} --version 2>&1)"; }} > "$HOME/trainer_args.txt"
  echo "{{\\"worker\\": \\"$FAKE_WORKER_ID\\", \\"prog\\": \\"trainer\\", \\"py\\": \\"$0\\"}}" >> "$FAKE_STATE/remote.jsonl"
  while [ -e "$FAKE_STATE/hold_trainer" ]; do sleep 0.1; done
  sleep "${{FAKE_TRAIN_SLEEP:-0}}"
  exit "${{FAKE_TRAIN_RC:-0}}"
fi
exec {python} "$@"
"""

FAKE_CURL = """#!/bin/sh
echo "${FAKE_WORKER_ID:-0}"
"""


def _write_exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _uv_version() -> str:
    for line in SCRIPT.read_text().splitlines():
        if line.startswith("UV_VERSION="):
            return line.split("=", 1)[1]
    raise AssertionError("no UV_VERSION in launch_tpu.sh")


class Env:
    """A sandbox: fake gcloud/gsutil/git on PATH, fakes of a worker's tools, a state dir, a
    HOME, and a runner."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.bin = tmp_path / "bin"
        self.remote_bin = tmp_path / "remote_bin"
        self.state = tmp_path / "state"
        self.home = tmp_path / "home"
        for d in (self.bin, self.remote_bin, self.state, self.home):
            d.mkdir()
        fake = FAKE_GCLOUD.format(python=sys.executable)
        _write_exe(self.bin / "gcloud", fake)
        _write_exe(self.bin / "gsutil", fake)
        _write_exe(self.bin / "git", FAKE_GIT.format(
            python=sys.executable, git=shutil.which("git"),
            constraints=str(ROOT / "constraints" / "tpu.txt")))
        _write_exe(self.remote_bin / "curl", FAKE_CURL)
        _write_exe(self.remote_bin / "python3", FAKE_IMAGE_PYTHON.format())
        self.venv_python = VENV_PYTHON.format(python=sys.executable)
        _write_exe(self.remote_bin / "uv", FAKE_UV.format(
            python=sys.executable, uv_version=_uv_version(), venv_python=self.venv_python))
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith(("RLCSD_", "FAKE_"))
        }
        self.env.update(
            PATH=f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
            FAKE_STATE=str(self.state),
            FAKE_REMOTE_BIN=str(self.remote_bin),
            FAKE_LS_REMOTE_SHAS="a" * 40,
            HOME=str(self.home),
            TMPDIR=str(tmp_path),
        )

    def make_venv(self, path: Path) -> Path:
        """A virtualenv as setup leaves it (its python runs the fake trainer)."""
        (path / "bin").mkdir(parents=True, exist_ok=True)
        _write_exe(path / "bin" / "python", self.venv_python)
        return path

    def run(self, *args, env=None, timeout=20, **kw):
        e = dict(self.env)
        e.update(env or {})
        return subprocess.run(
            ["bash", str(SCRIPT), *args], env=e, capture_output=True, text=True,
            timeout=timeout, **kw)

    def calls(self):
        f = self.state / "calls.jsonl"
        if not f.exists():
            return []
        return [json.loads(line) for line in f.read_text().splitlines()]

    def remote(self):
        f = self.state / "remote.jsonl"
        return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []

    def gcloud_calls(self, *prefix):
        return [c["argv"] for c in self.calls()
                if c["prog"] == "gcloud" and c["argv"][:len(prefix)] == list(prefix)]

    def set_state(self, *states):
        (self.state / "state").write_text(" ".join(states))


@pytest.fixture
def sb(tmp_path):
    return Env(tmp_path)


BASE = ["--name", "rl-pod", "--zone", "us-central2-b", "--project", "my-proj"]
RUN = ["--config", "configs/qwen3_1p7b.py", "--workdir", "gs://bkt/runs/q17"]


def _ok(p):
    assert p.returncode == 0, f"rc={p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p


def _command_of(argv):
    cmds = [a.split("=", 1)[1] for a in argv if a.startswith("--command=")]
    assert len(cmds) == 1, argv
    return cmds[0]


# ----------------------------------------------------------------------------------- basics


def test_help_exits_zero(sb):
    for args in (["--help"], ["-h"], ["help"], ["run", "--help"]):
        p = _ok(sb.run(*args))
        assert "babysit" in p.stdout and "RLCSD_ZONE" in p.stdout
    assert sb.calls() == []


def test_no_command_prints_usage_and_fails(sb):
    p = sb.run()
    assert p.returncode == 2 and "Usage:" in p.stderr


def test_missing_zone_is_a_clear_error(sb):
    p = sb.run("create", "--name", "rl-pod", "--accelerator", "v4-8")
    assert p.returncode != 0
    assert "zone" in p.stderr and "--zone" in p.stderr and "RLCSD_ZONE" in p.stderr
    assert sb.calls() == []


@pytest.mark.parametrize(
    "args, needle",
    [
        (["create", "--zone", "z-a"], "RLCSD_TPU_NAME"),
        (["create", "--name", "rl", "--zone", "us-central2-b"], "RLCSD_ACCELERATOR"),
        (["run", "--name", "rl", "--zone", "us-central2-b", "--workdir", "gs://b/x"],
         "RLCSD_CONFIG"),
        (["run", "--name", "rl", "--zone", "us-central2-b", "--config", "c.py",
          "--workdir", "/tmp/x"], "gs://"),
        (["setup", "--name", "rl", "--zone", "us-central2-b"], "--repo"),
        (["create", "--name", "rl", "--zone", "us-central2-b", "--accelerator", "v9x-8"],
         "--version"),
        (["create", "--name", "Bad_Name", "--zone", "us-central2-b", "--accelerator", "v4-8"],
         "bad TPU name"),
        (["create", "--bogus"], "unknown option"),
        (["run", "--config.seed=1"], "after '--'"),
        (["frobnicate"], "unknown command"),
        (["tail", "--name", "rl", "--zone", "us-central2-b", "--worker", "x"], "--worker"),
        (["run", "--name", "rl", "--zone", "us-central2-b", "--config", "c.py",
          "--workdir", "gs://b/x", "--marker_grace", "soon"], "--marker_grace"),
    ],
)
def test_bad_or_missing_values_fail_before_any_gcloud_call(sb, args, needle):
    p = sb.run(*args)
    assert p.returncode != 0
    assert needle in p.stderr
    assert sb.calls() == []


# ----------------------------------------------------------------------------------- create


def test_create_tpu_vm(sb):
    _ok(sb.run("create", *BASE, "--accelerator", "v4-8"))
    assert sb.gcloud_calls() == [[
        "compute", "tpus", "tpu-vm", "create", "rl-pod", "--zone=us-central2-b",
        "--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base", "--project=my-proj"]]


def test_create_spot_and_extra_create_args(sb):
    _ok(sb.run("create", *BASE, "--accelerator=v5p-32", "--spot",
               "--create_arg=--network=my-net"))
    (argv,) = sb.gcloud_calls()
    assert argv[:5] == ["compute", "tpus", "tpu-vm", "create", "rl-pod"]
    for a in ("--zone=us-central2-b", "--accelerator-type=v5p-32", "--version=v2-alpha-tpuv5",
              "--spot", "--network=my-net", "--project=my-proj"):
        assert a in argv


def test_create_queued_resource_spot(sb):
    _ok(sb.run("create", *BASE, "--queued", "--accelerator", "v4-64", "--spot"))
    (argv,) = sb.gcloud_calls()
    assert argv[:5] == ["compute", "tpus", "queued-resources", "create", "rl-pod"]
    for a in ("--zone=us-central2-b", "--node-id=rl-pod", "--accelerator-type=v4-64",
              "--runtime-version=tpu-ubuntu2204-base", "--spot", "--project=my-proj"):
        assert a in argv
    assert not any(a.startswith("--version=") for a in argv)


def test_create_queued_wait_polls_until_active(sb):
    p = _ok(sb.run("create", *BASE, "--queued", "--accelerator", "v4-8", "--wait",
                   "--interval", "0",
                   env={"FAKE_CREATE_STATES": "ACCEPTED,WAITING_FOR_RESOURCES,ACTIVE"}))
    assert len(sb.gcloud_calls("compute", "tpus", "queued-resources", "describe")) == 3
    assert "ACTIVE" in p.stderr


@pytest.mark.parametrize(
    "acc, typ, version",
    [
        ("v4-8", "v4-8", "tpu-ubuntu2204-base"),
        ("v4-64", "v4-64", "tpu-ubuntu2204-base"),
        ("v5e-16", "v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5litepod-8", "v5litepod-8", "v2-alpha-tpuv5-lite"),
        ("v5p-32", "v5p-32", "v2-alpha-tpuv5"),
        ("v6e-8", "v6e-8", "v2-alpha-tpuv6e"),
    ],
)
def test_default_runtime_version_per_generation(sb, acc, typ, version):
    _ok(sb.run("create", *BASE, "--accelerator", acc))
    (argv,) = sb.gcloud_calls()
    assert f"--accelerator-type={typ}" in argv and f"--version={version}" in argv


def test_runtime_version_override(sb):
    _ok(sb.run("create", *BASE, "--accelerator", "v4-8", "--runtime_version", "my-image"))
    assert "--version=my-image" in sb.gcloud_calls()[0]


def test_env_vars_configure_and_flags_override(sb):
    env = {"RLCSD_PROJECT": "env-proj", "RLCSD_ZONE": "europe-west4-a",
           "RLCSD_TPU_NAME": "env-tpu", "RLCSD_ACCELERATOR": "v5e-16", "RLCSD_SPOT": "1",
           "RLCSD_RUNTIME_VERSION": "env-version"}
    _ok(sb.run("create", env=env))
    _ok(sb.run("create", "--zone", "us-east5-a", "--name", "flag-tpu", "--accelerator", "v4-8",
               "--no-spot", "--project", "flag-proj", env=env))
    a, b = sb.gcloud_calls()
    assert a == ["compute", "tpus", "tpu-vm", "create", "env-tpu", "--zone=europe-west4-a",
                 "--accelerator-type=v5litepod-16", "--version=env-version", "--spot",
                 "--project=env-proj"]
    assert b == ["compute", "tpus", "tpu-vm", "create", "flag-tpu", "--zone=us-east5-a",
                 "--accelerator-type=v4-8", "--version=env-version", "--project=flag-proj"]


def test_no_project_means_no_project_flag(sb):
    _ok(sb.run("create", "--name", "rl", "--zone", "us-central2-b", "--accelerator", "v4-8"))
    assert not any(a.startswith("--project") for a in sb.gcloud_calls()[0])


# ------------------------------------------------------------------------------------ setup


def test_setup_from_repo_pins_the_commit_python_and_versions_and_copies_data(sb):
    _ok(sb.run("setup", *BASE, "--repo", "https://github.com/me/rlcsd_jax.git", "--ref", "v1",
               "--ckpt", "gs://bkt/ckpt/qwen3_1p7b_jax/", "--data", "gs://bkt/data/verl/"))
    (argv,) = sb.gcloud_calls()
    assert argv[:5] == ["compute", "tpus", "tpu-vm", "ssh", "rl-pod"]
    assert "--worker=all" in argv and "--zone=us-central2-b" in argv
    assert "--project=my-proj" in argv
    cmd = _command_of(argv)
    assert "RLCSD_REPO=https://github.com/me/rlcsd_jax.git" in cmd and "RLCSD_REF=v1" in cmd
    assert f"RLCSD_COMMIT={'a' * 40}\n" in cmd        # resolved here, once
    assert 'git clone "$RLCSD_REPO" "$RLCSD_DIR"' in cmd
    assert 'git -C "$RLCSD_DIR" checkout --detach "$RLCSD_COMMIT"' in cmd
    assert 'RLCSD_DIR="$HOME"/rlcsd_jax' in cmd and 'RLCSD_VENV="$HOME"/rlcsd_venv' in cmd
    assert "RLCSD_PYTHON=3.11\n" in cmd and "RLCSD_CONSTRAINTS=constraints/tpu.txt\n" in cmd
    assert '"$UV" venv --allow-existing --python "$RLCSD_PYTHON" "$RLCSD_VENV"' in cmd
    assert ('"$UV" pip install --python "$RLCSD_VENV/bin/python" -c "$RLCSD_CONSTRAINTS" '
            '"jax[tpu]" -e "$PKG"') in cmd
    assert "[test]" not in cmd and "python3 -m pip install -e" not in cmd
    assert "RLCSD_CKPT=gs://bkt/ckpt/qwen3_1p7b_jax\n" in cmd
    assert 'RLCSD_CKPT_DEST="$HOME"/checkpoints/qwen3_1p7b_jax' in cmd
    assert 'gcloud storage cp -r "$RLCSD_CKPT/*" "$RLCSD_CKPT_DEST/"' in cmd
    assert "RLCSD_DATA=gs://bkt/data/verl\n" in cmd
    assert 'RLCSD_DATA_DEST="$HOME"/rlcsd_jax/data/verl' in cmd
    assert cmd.index("pip install --python") < cmd.index("gcloud storage cp")


def test_setup_refuses_an_old_python_and_bad_values(sb):
    for args, needle in ((["--python", "3.10"], "3.11 or newer"),
                         (["--data", "/local/data"], "--data must be a gs://"),
                         (["--extras", "wandb;rm"], "bad --extras")):
        p = sb.run("setup", *BASE, "--repo", "https://x/y.git", *args)
        assert p.returncode == 2 and needle in p.stderr
    p = sb.run("setup", *BASE, "--repo", "https://x/y.git", env={"FAKE_LS_REMOTE_SHAS": "oops"})
    assert p.returncode == 2 and "could not resolve --ref HEAD" in p.stderr
    assert sb.calls() == []


def test_setup_from_local_src_packs_and_copies_to_every_worker(sb, tmp_path):
    src = tmp_path / "checkout"
    (src / "rlcsd_jax").mkdir(parents=True)
    (src / "rlcsd_jax" / "__init__.py").write_text("")
    (src / "pyproject.toml").write_text("[project]\nname='x'\n")
    (src / ".gitignore").write_text(".venv/\n")
    (src / ".venv").mkdir()
    (src / ".venv" / "big").write_text("x")
    git = ["git", "-c", "user.email=a@b", "-c", "user.name=a"]
    subprocess.run([*git, "init", "-q", str(src)], check=True)
    subprocess.run([*git, "-C", str(src), "add", "pyproject.toml", ".gitignore"], check=True)
    subprocess.run([*git, "-C", str(src), "commit", "-qm", "x"], check=True)
    _ok(sb.run("setup", *BASE, "--src", str(src), "--remote_dir", "/opt/code",
               "--python", "/opt/py312/bin/python3", "--venv", "/opt/venv", "--extras", "wandb"))
    rev = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                         text=True, check=True).stdout.strip()
    scp, ssh = sb.calls()
    assert scp["argv"][:4] == ["compute", "tpus", "tpu-vm", "scp"]
    assert "--worker=all" in scp["argv"] and "--zone=us-central2-b" in scp["argv"]
    assert "rl-pod:rlcsd_src.tar.gz" in scp["argv"]
    # Tracked and untracked-but-not-ignored files; no .git, no ignored venv.
    assert scp["tar_members"] == [".gitignore", "pyproject.toml", "rlcsd_jax/__init__.py"]
    assert ssh["argv"][:5] == ["compute", "tpus", "tpu-vm", "ssh", "rl-pod"]
    assert "--worker=all" in ssh["argv"]
    cmd = _command_of(ssh["argv"])
    assert "RLCSD_DIR=/opt/code" in cmd and "RLCSD_VENV=/opt/venv" in cmd
    assert "RLCSD_PYTHON=/opt/py312/bin/python3" in cmd and "RLCSD_EXTRAS=wandb" in cmd
    assert 'tar -xzf "$HOME/rlcsd_src.tar.gz" -C "$RLCSD_DIR"' in cmd
    # The checkout's commit goes along (the trainer records it): untracked files do not
    # make it dirty, a modified tracked file would.
    assert f"RLCSD_REVISION={rev}\n" in cmd
    assert "printf '%s\\n' \"$RLCSD_REVISION\" >\"$RLCSD_DIR/REVISION\"" in cmd
    assert "git clone" not in cmd
    # The temporary tarball is removed afterwards.
    assert not list(tmp_path.glob("launch_tpu.*"))


def test_setup_rejects_repo_and_src_together(sb, tmp_path):
    p = sb.run("setup", *BASE, "--repo", "u", "--src", str(tmp_path))
    assert p.returncode != 0 and "not both" in p.stderr


# -------------------------------------------------------------------------------------- run


def test_run_passes_config_workdir_and_extra_args_to_every_worker(sb):
    _ok(sb.run("run", *BASE, *RUN, "--env", "WANDB_MODE=offline", "--",
               "--config.seed=3", "--config.name=it's a test"))
    (argv,) = sb.gcloud_calls()
    assert argv[:5] == ["compute", "tpus", "tpu-vm", "ssh", "rl-pod"]
    assert "--worker=all" in argv and "--zone=us-central2-b" in argv
    assert "--project=my-proj" in argv
    cmd = _command_of(argv)
    assert ('set -- "$RLCSD_VENV/bin/python" -m rlcsd_jax.train --config=configs/qwen3_1p7b.py '
            "--workdir=gs://bkt/runs/q17 --config.seed=3 '--config.name=it'\\''s a test'") in cmd
    assert 'RLCSD_VENV="$HOME"/rlcsd_venv' in cmd
    assert "export RLCSD_DISTRIBUTED=1" in cmd and "export WANDB_MODE=offline" in cmd
    assert "RLCSD_GRACE=120\n" in cmd and "RLCSD_MARKER=DONE\n" in cmd
    assert "nohup" in cmd
    assert 'LOG="$HOME/rlcsd_logs/train_worker$W.log"' in cmd


def test_run_env_vars(sb):
    env = {"RLCSD_ZONE": "us-central2-b", "RLCSD_TPU_NAME": "rl-pod",
           "RLCSD_CONFIG": "configs/tiny.py", "RLCSD_WORKDIR": "gs://b/env"}
    _ok(sb.run("run", env=env))
    _ok(sb.run("run", "--config", "configs/qwen3_8b.py", env=env))
    first, second = (_command_of(a) for a in sb.gcloud_calls())
    assert "--config=configs/tiny.py --workdir=gs://b/env" in first
    assert "--config=configs/qwen3_8b.py --workdir=gs://b/env" in second


@pytest.mark.skipif(shutil.which("setsid") is None, reason="setsid (util-linux) not installed")
@pytest.mark.parametrize("train_rc, marker", [(0, "DONE"), (3, "FAILED")])
def test_run_remote_script_end_to_end(sb, train_rc, marker):
    """Execute the command `run` sends, locally, against a fake trainer."""
    code = sb.home / "rlcsd_jax"
    code.mkdir()
    (sb.state / "markers").mkdir()
    (sb.state / "markers" / "DONE").write_text("stale")
    venv = sb.make_venv(sb.tmp / "venv")
    _ok(sb.run("run", *BASE, *RUN, "--venv", str(venv),
               "--env", "EXTRA_ENV=a b", "--marker_grace", "0", "--", "--config.x=it's",
               env={"FAKE_SSH_EXEC": "1", "FAKE_TRAIN_RC": str(train_rc)}))
    log = sb.home / "rlcsd_logs" / "train_worker0.log"
    deadline = time.time() + 15
    while time.time() < deadline and "trainer exited" not in (
            log.read_text() if log.exists() else ""):
        time.sleep(0.05)
    text = log.read_text()
    assert f"trainer exited with status {train_rc} (signal received: 0)" in text
    args = (sb.home / "trainer_args.txt").read_text().splitlines()
    assert args[:-1] == ["-m", "rlcsd_jax.train", "--config=configs/qwen3_1p7b.py",
                         "--workdir=gs://bkt/runs/q17", "--config.x=it's", "RLCSD_DISTRIBUTED=1",
                         "EXTRA_ENV=a b", f"PWD={code}", f"PY={venv}/bin/python"]
    deadline = time.time() + 10
    while time.time() < deadline and not (sb.state / "markers" / marker).exists():
        time.sleep(0.05)
    other = {"DONE": "FAILED", "FAILED": "DONE"}[marker]
    assert (sb.state / "markers" / marker).read_text().startswith(f"rc={train_rc} ")
    assert not (sb.state / "markers" / other).exists()  # the stale DONE was removed first
    assert (sb.home / "rlcsd_logs" / "train.pid").read_text().strip().isdigit()


@pytest.mark.skipif(shutil.which("setsid") is None, reason="setsid (util-linux) not installed")
def test_run_refuses_a_second_trainer_and_force_stops_it_without_markers(sb):
    """A trainer stopped by SIGTERM (preemption, run --force) leaves no DONE/FAILED marker."""
    (sb.home / "rlcsd_jax").mkdir()
    args = ["run", *BASE, *RUN, "--venv", str(sb.make_venv(sb.tmp / "venv")),
            "--marker_grace=0"]
    log = sb.home / "rlcsd_logs" / "train_worker0.log"
    pidf = sb.home / "rlcsd_logs" / "train.pid"
    env = {"FAKE_SSH_EXEC": "1", "FAKE_TRAIN_SLEEP": "60"}
    _ok(sb.run(*args, env=env))
    first = int(pidf.read_text())
    try:
        p = sb.run(*args, env=env)
        assert p.returncode != 0 and "already running" in p.stderr
        _ok(sb.run(*args, "--force", env={"FAKE_SSH_EXEC": "1"}))
        deadline = time.time() + 15
        while time.time() < deadline and log.read_text().count("trainer exited") < 2:
            time.sleep(0.05)
        text = log.read_text()
        assert "trainer exited with status 143 (signal received: 1)" in text
        assert "trainer exited with status 0 (signal received: 0)" in text
        assert int(pidf.read_text()) != first
        deadline = time.time() + 10
        while time.time() < deadline and not (sb.state / "markers" / "DONE").exists():
            time.sleep(0.05)
        assert (sb.state / "markers" / "DONE").exists()  # from the second, clean run only
        assert not (sb.state / "markers" / "FAILED").exists()
    finally:
        try:
            os.killpg(first, 9)
        except OSError:
            pass


@pytest.mark.skipif(shutil.which("setsid") is None, reason="setsid (util-linux) not installed")
def test_no_marker_when_the_vm_is_signalled_during_the_grace_period(sb):
    """The trainer exits 0 (e.g. at the preemption sync point because another host was
    preempted); this VM's own SIGTERM arrives during the grace period: no DONE marker."""
    (sb.home / "rlcsd_jax").mkdir()
    log = sb.home / "rlcsd_logs" / "train_worker0.log"
    _ok(sb.run("run", *BASE, *RUN, "--venv", str(sb.make_venv(sb.tmp / "venv")),
               "--marker_grace", "60", env={"FAKE_SSH_EXEC": "1"}))
    pgid = int((sb.home / "rlcsd_logs" / "train.pid").read_text())
    try:
        deadline = time.time() + 10
        while time.time() < deadline and "unless this VM is stopped" not in log.read_text():
            time.sleep(0.05)
        assert "trainer exited with status 0 (signal received: 0)" in log.read_text()
        os.killpg(pgid, 15)
        deadline = time.time() + 10
        while time.time() < deadline and "not writing" not in log.read_text():
            time.sleep(0.05)
        assert "signal received: not writing gs://bkt/runs/q17/DONE" in log.read_text()
        assert not (sb.state / "markers" / "DONE").exists()
    finally:
        try:
            os.killpg(pgid, 9)
        except OSError:
            pass


# ------------------------------------------------------------------------ tail / ssh / status


def test_tail_worker0_by_default_and_other_workers(sb):
    _ok(sb.run("tail", *BASE))
    _ok(sb.run("tail", *BASE, "--worker", "3", "--lines", "20"))
    a, b = sb.gcloud_calls()
    assert a[:5] == ["compute", "tpus", "tpu-vm", "ssh", "rl-pod"] and "--worker=0" in a
    assert "--worker=3" in b and "--zone=us-central2-b" in b and "--project=my-proj" in b
    assert 'tail -n "$RLCSD_LINES" -F "$LOG"' in _command_of(b)
    assert "RLCSD_LINES=20" in _command_of(b)


def test_ssh_interactive_and_command(sb):
    _ok(sb.run("ssh", *BASE, "--worker", "2"))
    _ok(sb.run("ssh", *BASE, "--worker", "all", "--", "pgrep", "-af", "rlcsd_jax.train"))
    a, b = sb.gcloud_calls()
    assert a == ["compute", "tpus", "tpu-vm", "ssh", "rl-pod", "--zone=us-central2-b",
                 "--worker=2", "--project=my-proj"]
    assert "--worker=all" in b and _command_of(b) == "pgrep -af rlcsd_jax.train"


def test_status(sb):
    sb.set_state("READY")
    p = _ok(sb.run("status", *BASE))
    assert "rl-pod (us-central2-b): READY" in p.stdout
    (argv,) = sb.gcloud_calls()
    assert argv[:5] == ["compute", "tpus", "tpu-vm", "describe", "rl-pod"]
    (sb.state / "state").unlink()
    p = sb.run("status", *BASE, "--queued")
    assert p.returncode == 1 and "NOT_FOUND" in p.stdout
    assert sb.gcloud_calls()[-1][:4] == ["compute", "tpus", "queued-resources", "describe"]


# ----------------------------------------------------------------------------------- delete


def test_delete(sb):
    _ok(sb.run("delete", *BASE, "--quiet"))
    _ok(sb.run("delete", *BASE, "--queued"))
    a, b = sb.gcloud_calls()
    assert a == ["compute", "tpus", "tpu-vm", "delete", "rl-pod", "--zone=us-central2-b",
                 "--quiet", "--project=my-proj"]
    assert b[:5] == ["compute", "tpus", "queued-resources", "delete", "rl-pod"]
    assert "--force" in b and "--quiet" not in b


# ---------------------------------------------------------------------------------- babysit

BABYSIT = [*BASE, "--accelerator", "v4-64", "--spot", "--repo", "https://x/rlcsd_jax.git",
           *RUN, "--interval", "0"]


def _verbs(sb):
    out = []
    for c in sb.calls():
        a = c["argv"]
        if a[:2] == ["compute", "tpus"]:
            verb = a[3]
            if verb == "ssh":
                verb = "run" if "rlcsd_jax.train" in _command_of(a) else "setup"
            out.append(verb)
        elif a[:2] == ["storage", "ls"]:
            out.append("ls:" + a[2].rsplit("/", 1)[1])
    return out


def test_babysit_recreates_after_preemption_then_stops_when_done(sb):
    sb.set_state("PREEMPTED")
    p = _ok(sb.run("babysit", *BABYSIT, "--", "--config.seed=7",
                   env={"FAKE_DONE_AFTER_RUN": "1"}))
    assert _verbs(sb) == [
        "ls:DONE", "describe", "delete", "describe", "create",
        "ls:DONE", "describe", "setup", "run",
        "ls:DONE"]
    create = sb.gcloud_calls("compute", "tpus", "tpu-vm", "create")[0]
    for a in ("rl-pod", "--zone=us-central2-b", "--accelerator-type=v4-64", "--spot",
              "--project=my-proj"):
        assert a in create
    delete = sb.gcloud_calls("compute", "tpus", "tpu-vm", "delete")[0]
    assert "--quiet" in delete
    ssh = sb.gcloud_calls("compute", "tpus", "tpu-vm", "ssh")
    assert all("--worker=all" in a for a in ssh)
    run_cmd = _command_of(ssh[1])
    assert ("--config=configs/qwen3_1p7b.py --workdir=gs://bkt/runs/q17 --config.seed=7"
            in run_cmd)
    assert sb.gcloud_calls("storage", "ls")[0][2] == "gs://bkt/runs/q17/DONE"
    assert "training finished" in p.stderr


def test_babysit_gives_up_after_max_attempts(sb):
    sb.set_state("PREEMPTED")
    p = sb.run("babysit", *BABYSIT, "--max_attempts", "3",
               env={"FAKE_CREATE_STATES": "PREEMPTED"})
    assert p.returncode == 1
    assert len(sb.gcloud_calls("compute", "tpus", "tpu-vm", "create")) == 3
    assert len(sb.gcloud_calls("compute", "tpus", "tpu-vm", "delete")) == 3
    assert "giving up" in p.stderr


def test_babysit_max_attempts_from_env_and_create_failures_count(sb):
    p = sb.run("babysit", *BABYSIT, env={"RLCSD_MAX_ATTEMPTS": "2", "FAKE_CREATE_FAIL": "1"})
    assert p.returncode == 1
    assert len(sb.gcloud_calls("compute", "tpus", "tpu-vm", "create")) == 2
    assert sb.gcloud_calls("compute", "tpus", "tpu-vm", "delete") == []  # it never existed


def test_babysit_queued_waits_for_active_before_setup(sb):
    p = _ok(sb.run("babysit", *BABYSIT, "--queued", env={
        "FAKE_DONE_AFTER_RUN": "1", "FAKE_CREATE_STATES": "ACCEPTED,PROVISIONING,ACTIVE"}))
    assert _verbs(sb) == [
        "ls:DONE", "describe", "create",
        "ls:DONE", "describe",
        "ls:DONE", "describe",
        "ls:DONE", "describe", "setup", "run",
        "ls:DONE"]
    create = sb.gcloud_calls("compute", "tpus", "queued-resources", "create")[0]
    assert "--spot" in create and "--node-id=rl-pod" in create
    assert "PROVISIONING" in p.stderr


def test_babysit_leaves_a_healthy_tpu_alone_and_stops_on_failed_marker(sb):
    sb.set_state("READY", "READY", "READY")
    (sb.state / "markers").mkdir()
    p = subprocess.Popen(["bash", str(SCRIPT), "babysit", *BABYSIT],
                         env=sb.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 10
    while time.time() < deadline and len(sb.gcloud_calls("compute", "tpus", "tpu-vm",
                                                          "describe")) < 3:
        time.sleep(0.02)
    (sb.state / "markers" / "FAILED").write_text("rc=1")
    _, err = p.communicate(timeout=15)
    assert p.returncode == 1 and "FAILED" in err
    assert set(_verbs(sb)) == {"ls:DONE", "ls:FAILED", "describe"}


def test_babysit_recovers_a_preempted_tpu_even_with_a_failed_marker(sb):
    """A crash caused by another host's preemption must not stop the babysitter."""
    sb.set_state("PREEMPTED")
    (sb.state / "markers").mkdir()
    (sb.state / "markers" / "FAILED").write_text("rc=1")
    _ok(sb.run("babysit", *BABYSIT, env={"FAKE_DONE_AFTER_RUN": "1"}))
    assert len(sb.gcloud_calls("compute", "tpus", "tpu-vm", "create")) == 1


@pytest.mark.skipif(shutil.which("setsid") is None, reason="setsid (util-linux) not installed")
def test_babysit_recreations_set_up_the_same_python_commit_and_pins_on_every_worker(sb):
    """Two workers, executed for real against fakes of a TPU VM: missing TPU -> create ->
    setup + run (the trainer keeps running) -> PREEMPTED -> delete (processes and disks gone)
    -> create -> setup + run -> the trainer exits 0 -> worker 0 writes DONE -> babysit stops.

    Every setup on every worker installs uv, makes a Python 3.11 virtualenv (the image's
    python3 is 3.10), installs from constraints/tpu.txt and checks out the commit resolved
    ONCE, although the branch moved on between the recreations; the trainer is started by the
    virtualenv's python."""
    (sb.state / "hold_trainer").touch()          # the first run trains until the preemption
    a, b = "a" * 40, "b" * 40
    p = _ok(sb.run("babysit", *BABYSIT, "--data", "gs://bkt/data/verl", timeout=60,
                   env={"FAKE_SSH_EXEC": "1", "FAKE_WORKERS": "2", "RLCSD_MARKER_GRACE": "0",
                        "FAKE_CREATE_STATES": "READY,PREEMPTED;READY",
                        "FAKE_LS_REMOTE_SHAS": f"{a},{b}"}))
    assert "training finished" in p.stderr
    assert (sb.state / "markers" / "DONE").read_text().startswith("rc=0 ")
    assert len(sb.gcloud_calls("compute", "tpus", "tpu-vm", "create")) == 2
    assert (sb.state / "ls_remote_calls").read_text() == "1"     # resolved once
    remote = sb.remote()
    for worker in ("0", "1"):
        mine = [r for r in remote if r["worker"] == worker]
        uv_installs = [r for r in mine if r["prog"] == "python3"]
        venvs = [r["argv"] for r in mine if r["prog"] == "uv" and r["argv"][0] == "venv"]
        installs = [r for r in mine if r["prog"] == "uv" and r["argv"][:2] == ["pip", "install"]]
        checkouts = [r["argv"] for r in mine if r["prog"] == "git" and r["argv"][0] == "checkout"]
        trainers = [r["py"] for r in mine if r["prog"] == "trainer"]
        assert len(uv_installs) == 2 and "uv==" in uv_installs[0]["argv"]   # fresh disks
        home = str(sb.state / "workers" / f"w{worker}")
        assert venvs == [["venv", "--allow-existing", "--python", "3.11",
                          f"{home}/rlcsd_venv"]] * 2
        for r in installs:
            assert r["argv"][2:] == ["--python", f"{home}/rlcsd_venv/bin/python", "-c",
                                     "constraints/tpu.txt", "jax[tpu]", "-e", "."]
            assert r["cwd"] == f"{home}/rlcsd_jax"
        assert len(installs) == 2
        assert checkouts == [["checkout", "--detach", a]] * 2
        assert trainers == [f"{home}/rlcsd_venv/bin/python"] * 2
        args = (Path(home) / "trainer_args.txt").read_text()
        assert f"VERSION=Python {sys.version_info[0]}.{sys.version_info[1]}" in args
        assert (Path(home) / "rlcsd_jax" / "data" / "verl" / "FAKE_COPY").read_text() == (
            "gs://bkt/data/verl/*")


# ---------------------------------------------------------------------------------- dry run


@pytest.mark.parametrize(
    "args, expected",
    [
        (["create", *BASE, "--accelerator", "v5e-16", "--spot"],
         "gcloud compute tpus tpu-vm create rl-pod --zone=us-central2-b "
         "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite --spot "
         "--project=my-proj"),
        (["create", *BASE, "--accelerator", "v4-8", "--queued", "--wait"],
         "gcloud compute tpus queued-resources create rl-pod"),
        (["setup", *BASE, "--repo", "https://x/y.git", "--ckpt", "gs://b/c"],
         "gcloud compute tpus tpu-vm ssh rl-pod --zone=us-central2-b --worker=all"),
        (["run", *RUN, *BASE, "--", "--config.seed=1"],
         "--workdir=gs://bkt/runs/q17 --config.seed=1"),
        (["tail", *BASE], "gcloud compute tpus tpu-vm ssh rl-pod --zone=us-central2-b --worker=0"),
        (["status", *BASE], "gcloud compute tpus tpu-vm describe rl-pod"),
        (["delete", *BASE, "--quiet"],
         "gcloud compute tpus tpu-vm delete rl-pod --zone=us-central2-b --quiet"),
        (["babysit", *BABYSIT], "gcloud compute tpus tpu-vm create rl-pod"),
    ],
)
def test_dry_run_prints_and_executes_nothing(sb, args, expected):
    p = _ok(sb.run(*args, "--dry-run") if "--" not in args else sb.run("--dry-run", *args))
    assert expected in p.stdout
    assert sb.calls() == []


def test_dry_run_from_env_and_src_setup_packs_nothing(sb, tmp_path):
    p = _ok(sb.run("setup", *BASE, "--src", str(tmp_path), env={"RLCSD_DRY_RUN": "1"}))
    assert "gcloud compute tpus tpu-vm scp" in p.stdout and "--worker=all" in p.stdout
    assert sb.calls() == []
    assert not list(tmp_path.glob("launch_tpu.*"))


def test_dry_run_babysit_shows_the_whole_recovery(sb):
    p = _ok(sb.run("babysit", *BABYSIT, "--dry-run"))
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("gcloud ")]
    kinds = [ln.split()[4] if ln.startswith("gcloud compute") else ln.split()[2]
             for ln in lines]
    assert kinds == ["ls", "describe", "ls", "delete", "create", "ssh", "ssh"]
    assert sb.calls() == []


# -------------------------------------------------------------------------------- shellcheck


def test_shellcheck_is_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    p = subprocess.run(["shellcheck", "--severity=style", str(SCRIPT)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and p.stdout == "", p.stdout + p.stderr


def test_script_is_executable():
    assert os.access(SCRIPT, os.X_OK)


# ------------------------------------------------------------------------------ constraints


def test_constraints_pin_every_dependency_at_an_allowed_version():
    """constraints/tpu.txt (what setup installs from) is current: every dependency of
    pyproject.toml (and of the wandb extra) and JAX's TPU runtime is pinned, at a version the
    pyproject allows.  Regenerate it with the command in constraints/tpu.in."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "constraints" / "tpu.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["wandb"] + ["jax[tpu]"]
    stale = []
    for dep in wanted:
        req = Requirement(dep)
        version = pins.get(canonicalize_name(req.name))
        if version is None or not req.specifier.contains(version, prereleases=True):
            stale.append(f"{dep}: pinned {version}")
    assert not stale, ("constraints/tpu.txt is stale; regenerate it (constraints/tpu.in):\n  "
                       + "\n  ".join(stale))
    assert "libtpu" in pins and pins["jax"] == pins["jaxlib"]


# ------------------------------------------------------------------- the documented examples


def _documented_commands():
    """(doc, variable lines, command) for every `./launch_tpu.sh` line of the fenced bash blocks
    of the README and docs/tpu.md; the variables are the block's exports / assignments."""
    import re

    out = []
    for doc in ("README.md", "docs/tpu.md"):
        for block in re.findall(r"```bash\n(.*?)```", (ROOT / doc).read_text(), re.S):
            lines = block.replace("\\\n", " ").splitlines()
            variables = [ln for ln in lines
                         if re.match(r"\s*(export\s+)?[A-Za-z_][A-Za-z0-9_]*=", ln)]
            out += [(doc, variables, ln.strip()) for ln in lines
                    if ln.strip().startswith("./launch_tpu.sh")]
    return out


DOCUMENTED = _documented_commands()


def test_the_docs_have_launch_examples():
    docs = [d for d, _, _ in DOCUMENTED]
    assert docs.count("README.md") >= 6 and docs.count("docs/tpu.md") >= 9


@pytest.mark.parametrize("doc, variables, command", DOCUMENTED,
                         ids=[f"{d}:{c[:60]}" for d, _, c in DOCUMENTED])
def test_documented_example_passes_dry_run(sb, doc, variables, command):
    """Every documented launch_tpu.sh command, with its block's variables, works as written
    (here with RLCSD_DRY_RUN=1: it prints its gcloud commands and runs none)."""
    script = "\n".join([*variables, command])
    p = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True,
                       timeout=30, env={**sb.env, "RLCSD_DRY_RUN": "1", "USER": "me"})
    assert p.returncode == 0, f"{doc}: {command}\n{p.stderr}"
    assert "gcloud " in p.stdout, p.stdout
    assert sb.calls() == []
