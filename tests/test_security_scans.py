"""Static security checks that run in ``make test``.

- bandit over llm2clip/, components/ and pipelines/ with ``[tool.bandit]`` of pyproject.toml:
  no finding (the skipped checks say why there; every other exception is a ``# nosec BXXX  # why``
  on its line);
- detect-secrets over every git-tracked file: nothing beyond ``.secrets.baseline``, whose every
  entry was audited as no secret (Kubernetes Secret *names*, sha256 goldens of tests).

Each scanner is also shown to catch a planted finding, so a clean run means something. When a
new file holds a false positive: ``.venv/bin/detect-secrets scan --baseline .secrets.baseline``,
then audit the new entries (``detect-secrets audit .secrets.baseline``).
"""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BINARY = (".tar", ".png", ".jpg", ".jpeg", ".gguf", ".npy", ".safetensors")


def bandit(*targets: str) -> list[dict]:
    proc = subprocess.run([str(BIN / "bandit"), "-q", "-c", str(REPO / "pyproject.toml"), "-r", *targets,
                           "-f", "json"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.stdout, proc.stderr[-2000:]
    return json.loads(proc.stdout)["results"]


def test_bandit_finds_nothing_unexplained():
    found = bandit("llm2clip", "components", "pipelines")
    assert not found, [f"{r['filename']}:{r['line_number']} {r['test_id']} {r['issue_text']}" for r in found]


def test_bandit_catches_planted_findings(tmp_path):
    (tmp_path / "planted.py").write_text(
        "import pickle\nimport subprocess\nimport yaml\n\n\n"
        "def load(text, blob, cmd):\n"
        "    subprocess.run(cmd, shell=True)\n"
        "    return yaml.load(text, Loader=yaml.Loader), pickle.loads(blob)\n")
    assert {r["test_id"] for r in bandit(str(tmp_path))} >= {"B506", "B301", "B602"}


def tracked_text_files() -> list[str]:
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    return [n for n in names if not n.endswith(BINARY) and n != ".secrets.baseline" and (REPO / n).is_file()]


def detect_secrets(files: list[str], baseline: Path | None = None) -> subprocess.CompletedProcess:
    args = ["--baseline", str(baseline)] if baseline else []
    return subprocess.run([str(BIN / "detect-secrets-hook"), *args, *files], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def test_no_secret_beyond_the_audited_baseline():
    baseline = json.loads((REPO / ".secrets.baseline").read_text())
    assert all(entry["is_secret"] is False for items in baseline["results"].values() for entry in items)
    proc = detect_secrets(tracked_text_files(), REPO / ".secrets.baseline")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_detect_secrets_catches_a_planted_key(tmp_path):
    key = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYzQ81e7Tk9AbC"  # built here, so this file holds no key
    planted = tmp_path / "settings.py"
    planted.write_text(f'aws_secret_access_key = "{key}"\n')
    proc = detect_secrets([str(planted)])
    assert proc.returncode == 1 and "Secret" in proc.stdout
