"""The image, proven without a Docker daemon.

The build context is assembled as the builder would: the files of a fresh clone
(`git ls-files`: tracked, plus untracked files git does not ignore, i.e. what a commit
would carry) filtered by `.dockerignore` with Docker's rules (last matching pattern
wins; a pattern matching a parent folder matches everything under it; `!` lets back in).
Then the Dockerfile is executed from that context, instruction by instruction, with
every container path mapped under one scratch root: ARG/ENV/WORKDIR/COPY/RUN of the build
stage (the venv, torch, `pip install .`), the final stage's COPYs, and its ENTRYPOINT +
CMD (as USER's uid when we are root), which must answer /v2/health/ready and the
HEALTHCHECK command.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest

from serverproc import ChildProcess

ROOT = Path(__file__).resolve().parents[2]


# ---- .dockerignore ------------------------------------------------------------------
def _pattern_regex(pattern: str) -> re.Pattern:
    """Docker's (moby patternmatcher) pattern: filepath.Match plus `**` for any depth."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif c == "*":
            out, i = out + "[^/]*", i + 1
        elif c == "?":
            out, i = out + "[^/]", i + 1
        elif c == "[":
            end = pattern.index("]", i)
            body = pattern[i + 1:end].replace("\\", "\\\\")
            out, i = out + "[" + ("^" + body[1:] if body.startswith("^") else body) + "]", end + 1
        else:
            out, i = out + re.escape(c), i + 1
    return re.compile(out + r"\Z")


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pat = os.path.normpath(line[1:] if negated else line).lstrip("/")
        rules.append((negated, _pattern_regex(pat)))
    return rules


def excluded(path: str, rules) -> bool:
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    out = False
    for negated, rx in rules:
        if any(rx.match(c) for c in candidates):
            out = not negated
    return out


def test_dockerignore_rules_behave_like_dockers():
    rules = dockerignore_rules("**\n!runtime/\n!configs/a.yaml\n**/__pycache__\n")
    assert excluded("tests/x.py", rules) and excluded("configs/b.yaml", rules)
    assert not excluded("runtime/server/app.py", rules) and not excluded("configs/a.yaml", rules)
    assert excluded("runtime/__pycache__/x.pyc", rules)


def source_files() -> list[str]:
    """What a clone of this commit (plus files git would add) holds."""
    if shutil.which("git") is None:
        pytest.skip("git is needed")
    proc = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                          cwd=ROOT, capture_output=True)
    if proc.returncode != 0:
        pytest.skip("not a git checkout")
    return sorted({p for p in proc.stdout.decode().split("\0") if p and (ROOT / p).is_file()})


def build_context(dest: Path) -> list[str]:
    rules = dockerignore_rules((ROOT / ".dockerignore").read_text())
    kept = [p for p in source_files() if not excluded(p, rules)]
    for rel in kept:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    return kept


# ---- Dockerfile ---------------------------------------------------------------------
def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") and not buf.strip():
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    return out


DOCKERFILE = instructions((ROOT / "Dockerfile").read_text())


def _copy_args(rest: str) -> tuple[str | None, list[str], str]:
    words = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
    flags = [w for w in words if w.startswith("--")]
    words = [w for w in words if not w.startswith("--")]
    frm = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
    return frm, words[:-1], words[-1]


def test_every_copy_source_is_in_the_context(tmp_path):
    kept = set(build_context(tmp_path))
    for word, rest in DOCKERFILE:
        if word != "COPY":
            continue
        frm, sources, _ = _copy_args(rest)
        if frm is not None:
            continue
        for src in sources:
            src = src.rstrip("/")
            assert src in kept or any(k.startswith(src + "/") for k in kept), \
                f"COPY {src}: not in the build context (.dockerignore or not tracked by git)"
    # the packages pyproject installs, and never the git-ignored server copy of the config
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    for pkg in packages:
        assert pkg.replace(".", "/") + "/__init__.py" in kept, f"{pkg} is not in the build context"
    assert "configs/splitserve.yaml" not in kept
    assert not {k.split("/")[0] for k in kept} & {"tests", "bench", ".venv", ".git", "tools"}


class Builder:
    """Executes the Dockerfile's instructions with container paths mapped under `fs`."""

    def __init__(self, context: Path, fs: Path, python_dir: Path):
        self.context, self.fs, self.python_dir = context, fs, python_dir
        self.args: dict[str, str] = {}
        self.env: dict[str, str] = {}
        self.workdir = "/"
        self.user: str | None = None
        self.healthcheck = self.entrypoint = self.cmd = None
        roots = set()
        for word, rest in DOCKERFILE:
            if word == "WORKDIR":
                roots.add(rest)
            elif word == "COPY":
                dest = _copy_args(rest)[2]
                if dest.startswith("/"):
                    roots.add(dest.rstrip("/"))
        self.roots = sorted(roots, key=len, reverse=True)

    def host(self, path: str) -> Path:
        path = path if path.startswith("/") else os.path.join(self.workdir, path)
        return self.fs / os.path.normpath(path).lstrip("/")

    def mapped(self, text: str) -> str:
        for r in self.roots:
            text = re.sub(rf"(?<![\w.]){re.escape(r)}(?=[/\s\"':]|$)", str(self.host(r)), text)
        return text

    def expand(self, text: str) -> str:
        scope = {**os.environ, **self.args, **self.env}
        return re.sub(r"\$\{?(\w+)\}?", lambda m: scope.get(m.group(1), ""), text)

    def stage(self) -> None:
        self.env = {"PATH": f"{self.python_dir}:/usr/local/bin:/usr/bin:/bin"}
        self.args, self.workdir, self.user = {}, "/", None

    def run(self, word: str, rest: str) -> None:
        if word == "FROM":
            self.stage()
        elif word == "ARG":
            name, _, default = rest.partition("=")
            self.args[name] = json.loads(default) if default.startswith('"') else default
        elif word == "ENV":
            for item in shlex.split(rest):
                k, _, v = item.partition("=")
                self.env[k] = self.mapped(self.expand(v))
        elif word == "WORKDIR":
            self.workdir = rest
            self.host(rest).mkdir(parents=True, exist_ok=True)
        elif word == "COPY":
            frm, sources, dest = _copy_args(rest)
            for src in sources:
                self._copy(frm, src, dest, many=len(sources) > 1)
        elif word == "RUN":
            cmd = self.mapped(rest)
            for path in re.findall(r"(?<![\w.$])/[\w./-]+", cmd):
                assert path.startswith(str(self.fs)) or path == "/dev/null", \
                    f"RUN names {path}: not a mapped container path (WORKDIR/COPY), so it would touch this machine"
            env = {**{k: v for k, v in os.environ.items() if k.startswith("PIP_")},
                   **self.args, **self.env, "HOME": str(self.fs / "root")}
            proc = subprocess.run(["/bin/sh", "-c", cmd], cwd=self.host(self.workdir),
                                  env=env, capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, f"RUN {rest[:80]}... failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        elif word == "USER":
            self.user = rest
        elif word == "HEALTHCHECK":
            self.healthcheck = [self.mapped(w) for w in json.loads(rest.split(" CMD ", 1)[1])]
        elif word == "ENTRYPOINT":
            self.entrypoint = [self.mapped(w) for w in json.loads(rest)]
        elif word == "CMD":
            self.cmd = [self.mapped(w) for w in json.loads(rest)]

    def _copy(self, frm: str | None, src: str, dest: str, many: bool) -> None:
        origin = self.host(src) if frm else self.context / src
        target = self.host(dest)
        if dest.endswith("/") or many or (origin.is_file() and target.is_dir()):
            target = target / origin.name if origin.is_file() else target
        if origin == target:
            return  # COPY --from=build /x /x: both stages share the scratch root
        if origin.is_dir():
            shutil.copytree(origin, target, dirs_exist_ok=True, symlinks=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, target)


def test_a_run_step_never_touches_this_machine(tmp_path):
    b = Builder(tmp_path / "context", tmp_path / "fs", tmp_path / "python")
    with pytest.raises(AssertionError, match="RUN names /usr/local/lib: not a mapped"):
        b.run("RUN", "rm -rf /usr/local/lib")
    assert str(tmp_path / "fs" / "opt" / "splitserve") in b.mapped("python -m venv /opt/splitserve")


@pytest.fixture(scope="module")
def image():
    """The Dockerfile executed from its build context, once for this module's tests."""
    scratch = Path(tempfile.mkdtemp(prefix="splitserve-image-"))
    try:
        os.chmod(scratch, 0o755)  # USER 10001 reads the venv and the models in here
        context, fs, shim = scratch / "context", scratch / "fs", scratch / "python"
        context.mkdir(), fs.mkdir(), shim.mkdir()
        build_context(context)
        # the base image's `python`: this interpreter's base, never the test's venv
        (shim / "python").symlink_to(sys._base_executable)
        b = Builder(context, fs, shim)
        for word, rest in DOCKERFILE:
            b.run(word, rest)
        yield b
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _serve(b: Builder, as_user: bool) -> ChildProcess:
    """The image's ENTRYPOINT + CMD on loopback ports 0 (as USER's uid when we are root)."""
    cmd = b.entrypoint + b.cmd + ["--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0"]
    cmd[0] = shutil.which(cmd[0], path=b.env["PATH"])
    if as_user and os.geteuid() == 0 and shutil.which("setpriv"):
        uid, _, gid = b.user.partition(":")
        cmd = ["setpriv", f"--reuid={uid}", f"--regid={gid or uid}", "--clear-groups", *cmd]
    env = {k: None for k in os.environ if k.startswith(("PYTHON", "VIRTUAL_ENV", "SPLITSERVE"))}
    srv = ChildProcess(cmd, name="image", cwd=b.fs, env={**env, **b.env})
    srv.wait_ready(300)
    return srv


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_image_builds_from_its_context_and_serves(image):
    b = image
    assert b.user and not b.user.startswith("0") and b.entrypoint and b.cmd
    venv = b.host("/opt/splitserve")
    got = subprocess.run([str(venv / "bin" / "python"), "-c",
                          "import torch, splitserve, runtime; print(torch.version.cuda, "
                          "splitserve.__version__, runtime.__file__)"],
                         cwd=b.fs, capture_output=True, text=True, env={"PATH": b.env["PATH"]})
    cuda, version, where = got.stdout.split()
    assert cuda == "None", "the default image must carry CPU torch"
    assert where.startswith(str(venv)), "splitserve must run from the image's venv, not the checkout"

    srv = _serve(b, as_user=True)
    try:
        assert "models=mlp:1,2" in srv.log_text(), srv.log_text(20)
        probe = [c.replace("127.0.0.1:8000", f"127.0.0.1:{srv.http_port}") for c in b.healthcheck]
        probe[0] = shutil.which(probe[0], path=b.env["PATH"])
        assert subprocess.run(probe, env=b.env, timeout=30).returncode == 0, "HEALTHCHECK failed"
    finally:
        srv.stop(30)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_second_command_installing_tritonclient_leaves_it_serving_grpc(image):
    """Install order does not matter: `pip install tritonclient[grpc]` (the newest, which
    pins protobuf<7) after splitserve breaks no requirement of splitserve's packages, and
    the server still serves gRPC to that client."""
    b = image
    venv = b.host("/opt/splitserve")
    env = {**{k: v for k, v in os.environ.items() if k.startswith("PIP_")},
           "PATH": b.env["PATH"], "HOME": str(b.fs / "root")}
    got = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "tritonclient[grpc]"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stderr[-2000:]
    check = subprocess.run([str(venv / "bin" / "pip"), "check"], env=env, capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0, f"broken requirements after the second command:\n{check.stdout}"
    srv = _serve(b, as_user=False)
    try:
        code = ("import sys, numpy as np, tritonclient.grpc as g; c = g.InferenceServerClient(sys.argv[1]); "
                "assert c.is_server_ready(); i = g.InferInput('input', [1, 64], 'FP32'); "
                "i.set_data_from_numpy(np.zeros((1, 64), np.float32)); "
                "print(c.infer('mlp', [i]).as_numpy('output').shape)")
        out = subprocess.run([str(venv / "bin" / "python"), "-c", code, srv.grpc_target], cwd=b.fs,
                             env={"PATH": b.env["PATH"]}, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.strip() == "(1, 8)", out.stderr[-2000:]
    finally:
        srv.stop(30)
