"""Crash drill: `dvc repro` of the tiny pipeline SIGKILLed at seeded random points inside its long
stages, started again after every kill, then checked.

A kill takes the whole process tree down at once (dvc, the stage's python, torchrun, its ranks
and their loader workers), as a lost node does. The drill is its process tree's subreaper, so a
rank orphaned between listing and killing still comes back to it and is killed too. The points
are drawn from ``random.Random(seed)``: each kill lands ``fraction x duration`` seconds after the
stage's own process started, ``fraction`` uniform in [0.05, 0.95] and ``duration`` the stage's
time in an uninterrupted repro on the same machine just before (``--reference``), else ESTIMATE_S. A kill that finds
the stage's process already ended (dvc was committing its outputs: killed too, and recorded as
not landed) is tried again at half that time when the stage runs again. After the last kill
`dvc repro` runs to the end; then:

- `dvc status` is clean and another `dvc repro` runs no stage;
- every output's manifest reads as its stage's (llm2clip.contracts) and every file a manifest
  lists has the sha256 it records: no partial output reads as complete;
- with ``--reference``, every output file is byte-identical to the uninterrupted repro's, except
  what records a time, a path or an MLflow run (VOLATILE_FILES, VOLATILE_KEYS).

    .venv/bin/python tests/kill_drill.py --kills 21 --seed 0 --reference --workdir /tmp/kill-drill
make test runs 5 kills, one per long pipeline stage (the session fixture ``reproduced`` of
tests/conftest.py, whose clone the DVC tests then check).
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import random
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import yaml

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from test_dvc import BIN, clean_clone, dvc, dvc_env  # noqa: E402

# The stages that run long enough to be caught mid-work, in the order `dvc repro` runs them.
LONG_STAGES = ("prepare_data", "caption_contrastive", "embed_captions", "prepare_eval@scenes_long",
               "embed_eval@scenes_long", "train_vision", "evaluate")
# One kill in each of these is what `make test` runs.
PIPELINE_STAGES = ("prepare_data", "caption_contrastive", "embed_captions", "train_vision", "evaluate")
# Seconds from a stage's process start to its end on the 2-core box (the shortest seen), used
# when no reference run measured them.
ESTIMATE_S = {"prepare_data": 9.0, "caption_contrastive": 18.0, "embed_captions": 9.0,
              "prepare_eval@scenes_long": 6.0, "embed_eval@scenes_long": 7.0, "train_vision": 12.0,
              "evaluate": 12.0}
# What differs between two uninterrupted repros: files that are reports for people, record an
# MLflow run, or list other files' digests (manifest.json: checked by verify_outputs, and the
# files it lists compared one by one), and JSON keys that record when, how
# fast, where or under which id. Everything else must be byte-identical (weights, shards,
# embeddings, metrics); a JSON file is compared with those keys dropped and the clone's path
# replaced.
VOLATILE_FILES = re.compile(r"(^|/)(registration\.json|manifest\.json|[^/]*\.(html|md|png|log))$"
                            r"|/checkpoints/|/data_docs/")
VOLATILE_KEYS = {"wall_time_s", "seconds", "mean_samples_per_second", "ge_load_time", "checkpoint_id", "run_time",
                 "validation_id", "validation_time", "loop_wall_time_s"}
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
RUNNING = re.compile(r"^Running stage '([^']+)'")


@dataclass
class Kill:
    stage: str
    after_s: float  # seconds after the stage's process started
    landed: bool  # the stage's process was alive when the tree went down (else: dvc committing it)
    processes: int  # how many processes the kill took down
    files_in_outs: int  # files the stage had written (a kill mid-write leaves some)


@dataclass
class Report:
    seed: int
    kills: list[Kill] = field(default_factory=list)
    attempts: int = 0  # dvc repro starts, the final uninterrupted one included
    seconds: float = 0.0
    checks: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "landed": self.landed}

    @property
    def landed(self) -> int:
        return sum(k.landed for k in self.kills)

    def summary(self) -> str:
        per_stage: dict[str, int] = {}
        for k in self.kills:
            per_stage[k.stage] = per_stage.get(k.stage, 0) + k.landed
        mid_write = sum(1 for k in self.kills if k.landed and k.files_in_outs)
        return (f"{self.landed} kills landed in {self.attempts} dvc repro starts, {self.seconds:.0f} s "
                f"({', '.join(f'{s} {n}' for s, n in per_stage.items())}); {mid_write} with a partial output "
                f"on disk; checks: {json.dumps(self.checks)}")


def become_subreaper() -> None:
    """Orphans of the repro's tree (a rank whose torchrun was killed first) are re-parented to us."""
    PR_SET_CHILD_SUBREAPER = 36  # noqa: N806 (linux/prctl.h)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def kill_tree(root: psutil.Process, exclude: set[int]) -> int:
    """SIGKILL ``root`` and every process below it, until none is left; returns how many."""
    killed: set[int] = set()
    for _ in range(20):
        try:
            victims = [root, *root.children(recursive=True)] if root.is_running() else []
        except psutil.NoSuchProcess:
            victims = []
        # orphans re-parented to this (subreaper) process while the tree went down
        victims += [p for p in psutil.Process().children(recursive=True)
                    if p.pid not in exclude and p.pid not in killed]
        victims = [p for p in victims if p.pid not in killed]
        if not victims:
            break
        for victim in victims:
            try:
                victim.send_signal(signal.SIGKILL)
                killed.add(victim.pid)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(victims, timeout=10)
    return len(killed)


def stage_spec(clone: Path, stage: str) -> tuple[dict, str]:
    """``stage``'s dvc.yaml entry (a foreach stage's ``do``) and its ``${key}`` (or "")."""
    name, _, item = stage.partition("@")
    spec = yaml.safe_load((clone / "dvc.yaml").read_text())["stages"][name]
    return spec.get("do", spec), item


def stage_command(clone: Path, stage: str) -> list[str]:
    """The arguments after ``python`` in ``stage``'s dvc.yaml command (``${key}`` filled in)."""
    spec, item = stage_spec(clone, stage)
    return shlex.split(spec["cmd"].replace("${key}", item))[1:]


def stage_process(root: psutil.Process, command: list[str]) -> psutil.Process | None:
    """The process `dvc repro` started for a stage: its command line ends with ``command``."""
    for proc in root.children(recursive=True):
        try:
            if proc.cmdline()[-len(command):] == command:
                return proc
        except psutil.Error:
            continue
    return None


def stage_outs(clone: Path, stage: str) -> list[Path]:
    spec, item = stage_spec(clone, stage)
    return [clone / str(o).replace("${key}", item) for o in spec.get("outs", [])]


def count_files(paths: list[Path]) -> int:
    return sum(1 for p in paths if p.exists() for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())


class Repro:
    """One `dvc repro` in the background, its output lines timestamped as they come."""

    def __init__(self, clone: Path, log) -> None:
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=clone, env=dvc_env(clone.parent),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self._reader = threading.Thread(target=self._read, args=(log,), daemon=True)
        self._reader.start()

    def _read(self, log) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))
            log.write(line)

    def current_stage(self) -> str | None:
        for _, line in reversed(self.lines):
            if match := RUNNING.match(line):
                return match.group(1)
        return None

    def finish(self) -> int:
        code = self.proc.wait()
        self._reader.join(timeout=10)
        return code


def plan_kills(kills: int, seed: int, stages: tuple[str, ...] = LONG_STAGES) -> dict[str, list[float]]:
    """``kills`` kill points (fractions of a stage's duration) spread over ``stages``, seeded."""
    rng = random.Random(seed)
    points: dict[str, list[float]] = {s: [] for s in stages}
    for i in range(kills):
        points[stages[i % len(stages)]].append(round(rng.uniform(0.05, 0.95), 3))
    return {s: p for s, p in points.items() if p}


def repro_with_kills(clone: Path, kills: int, seed: int, durations: dict[str, float] | None = None,
                     log=None, stages: tuple[str, ...] = LONG_STAGES) -> Report:
    """`dvc repro` in ``clone``, killed ``kills`` times (see the module docstring), then to the end."""
    become_subreaper()
    log = log or sys.stderr
    exclude = {p.pid for p in psutil.Process().children(recursive=True)}  # e.g. a test's servers
    durations = {s: (durations or ESTIMATE_S)[s] for s in stages}
    pending = plan_kills(kills, seed, stages)
    report, start = Report(seed=seed), time.monotonic()
    while True:
        repro, victim = Repro(clone, log), None
        report.attempts += 1
        while repro.proc.poll() is None and victim is None:
            stage = repro.current_stage()
            proc = (stage_process(psutil.Process(repro.proc.pid), stage_command(clone, stage))
                    if pending.get(stage) else None)
            if proc is None:
                time.sleep(0.05)
                continue
            after = pending[stage][0] * durations[stage]
            started = proc.create_time()
            while proc.is_running() and time.time() < started + after:
                time.sleep(0.01)
            landed = proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
            files = count_files(stage_outs(clone, stage))
            processes = kill_tree(psutil.Process(repro.proc.pid), exclude)
            if landed:
                pending[stage].pop(0)
            else:  # the stage ended first (dvc was caught committing it): try again, earlier
                durations[stage] = max(0.5, (time.time() - started) / 2)
            victim = Kill(stage, round(time.time() - started, 2), landed, processes, files)
            report.kills.append(victim)
            log.write(f"### kill {len(report.kills)}: {victim}\n")
        code = repro.finish()
        if victim is None:
            for stage, points in pending.items():  # planned kills that never found their stage running
                report.kills.extend(Kill(stage, 0.0, False, 0, 0) for _ in points)
            if code != 0:
                raise RuntimeError(f"dvc repro failed ({code}) after {len(report.kills)} kills:\n"
                                   + "".join(line for _, line in repro.lines[-60:]))
            break
    report.seconds = time.monotonic() - start
    return report


def manifest_files(manifest: dict) -> list[tuple[str, str]]:
    """(file name, sha256) of every file a manifest lists in its own folder: ``files`` maps,
    shard and sidecar lists (``name`` + ``sha256``)."""
    found: list[tuple[str, str]] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("name"), str) and isinstance(node.get("sha256"), str):
                found.append((node["name"], node["sha256"]))
            for key, value in node.items():
                if key == "files" and isinstance(value, dict):
                    found.extend((k, v) for k, v in value.items() if isinstance(v, str))
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(manifest)
    return found


def verify_outputs(clone: Path) -> dict[str, int]:
    """Every output manifest reads as its stage's and every file it lists has its sha256.

    Returns {output folder: files checked}; raises AssertionError naming the first mismatch.
    """
    from llm2clip.contracts import read_manifest

    checked: dict[str, int] = {}
    for manifest_path in sorted(clone.glob("*/**/manifest.json")):
        if ".dvc" in manifest_path.parts or "checkpoints" in manifest_path.parts:
            continue
        folder = manifest_path.parent
        manifest = read_manifest(json.loads(manifest_path.read_text())["stage"], str(folder))
        files = manifest_files(manifest)
        for name, sha in files:
            path = next((p for p in (folder / name, *folder.rglob(name)) if p.is_file()), None)
            assert path is not None, f"{folder}: {name} is listed in manifest.json but missing"
            got = hashlib.sha256(path.read_bytes()).hexdigest()
            assert got == sha, f"{path}: sha256 {got}, manifest.json says {sha}"
        checked[str(folder.relative_to(clone))] = len(files)
    return checked


def _normalized(value, clone: str):
    if isinstance(value, dict):
        return {k: _normalized(v, clone) for k, v in value.items()
                if k not in VOLATILE_KEYS and not (k == "id" and UUID.fullmatch(str(v)))}  # great-expectations' ids
    if isinstance(value, list):
        return [_normalized(v, clone) for v in value]
    return value.replace(clone, "<clone>") if isinstance(value, str) else value


def output_digests(clone: Path) -> dict[str, str]:
    """sha256 of every output file (VOLATILE_FILES left out; JSON normalised), by relative path."""
    stages = yaml.safe_load((clone / "dvc.yaml").read_text())["stages"]
    keys = yaml.safe_load((clone / "params.yaml").read_text()).get("eval_data", {})
    outs = [o.replace("${key}", k) for s in stages.values() for o in s.get("do", s).get("outs", [])
            for k in (keys if "${key}" in o else [""])]
    digests = {}
    for out in outs:
        root = clone / out
        for f in ([root] if root.is_file() else sorted(root.rglob("*"))):
            rel = str(f.relative_to(clone))
            if not f.is_file() or VOLATILE_FILES.search(rel):
                continue
            data = f.read_bytes()
            if f.suffix == ".json":
                data = json.dumps(_normalized(json.loads(data), str(clone)), sort_keys=True).encode()
            digests[rel] = hashlib.sha256(data).hexdigest()
    return digests


def check(clone: Path, report: Report, reference: Path | None = None) -> Report:
    """The checks after the last kill (module docstring); raises AssertionError on any failure."""
    status = json.loads(dvc(["status", "--json"], clone))
    assert status == {}, f"dvc status after the drill: {status}"
    again = dvc(["repro"], clone)
    ran = re.findall(r"Running stage '([^']+)'", again)
    assert not ran, f"dvc repro after the drill ran {ran}"
    checked = verify_outputs(clone)
    report.checks.update(dvc_status_clean=True, repro_again_ran=0, manifests=len(checked),
                         files_verified=sum(checked.values()))
    if reference is not None:
        ours, theirs = output_digests(clone), output_digests(reference)
        assert ours.keys() == theirs.keys(), f"files differ: {sorted(ours.keys() ^ theirs.keys())}"
        differ = sorted(k for k in ours if ours[k] != theirs[k])
        assert not differ, f"differ from the uninterrupted repro: {differ}"
        report.checks["identical_to_reference"] = len(ours)
    return report


def measure_durations(clone: Path, log) -> dict[str, float]:
    """An uninterrupted `dvc repro` in ``clone``; each long stage's seconds from its process start."""
    become_subreaper()
    repro, seen = Repro(clone, log), {}
    while repro.proc.poll() is None:
        stage = repro.current_stage()
        if stage in LONG_STAGES and stage not in seen:
            proc = stage_process(psutil.Process(repro.proc.pid), stage_command(clone, stage))
            if proc is not None:
                seen[stage] = proc.create_time()
                while proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    time.sleep(0.02)
                seen[stage] = time.time() - seen[stage]
        time.sleep(0.02)
    assert repro.finish() == 0, "the reference dvc repro failed:\n" + "".join(x for _, x in repro.lines[-60:])
    return {s: round(v, 2) for s, v in seen.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=21)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, required=True, help="an empty folder for the clones")
    parser.add_argument("--reference", action="store_true",
                        help="also run an uninterrupted repro, time its stages and compare every output")
    parser.add_argument("--report", type=Path, help="write the report here as JSON")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    log = open(args.workdir / "drill.log", "w")  # noqa: SIM115 (open for the whole run)
    reference, durations = None, None
    if args.reference:
        reference = clean_clone(args.workdir / "reference" / "repo", workdir=args.workdir)
        durations = measure_durations(reference, log)
        print(f"uninterrupted repro: stage seconds {durations}", flush=True)
    clone = clean_clone(args.workdir / "killed" / "repo", workdir=args.workdir)
    report = check(clone, repro_with_kills(clone, args.kills, args.seed, durations, log), reference)
    if args.report:
        args.report.write_text(json.dumps(report.to_dict(), indent=1))
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
