"""`--profile`: py-spy samples Pixiebox while a measurement runs; the top functions by own time
(and by total time) go into the log, the raw collapsed stacks to out/bench/profiles/."""

from __future__ import annotations

import collections
import contextlib
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Profile:
    path: Path
    summary: str = ""


def _py_spy() -> str | None:
    venv = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "py-spy"
    return str(venv) if venv.exists() else shutil.which("py-spy")


def summarize(path: Path, top: int = 12) -> str:
    """Top frames by self and by inclusive share of samples, from py-spy's raw output."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = [
            f.split(" (")[0] + " " + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1]
            for f in stack.split(";")
            if f
        ]
        if not frames:
            continue
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    if not samples:
        return ""
    lines = [f"    {samples} samples; own time:"]
    lines += [f"      {n / samples:6.1%}  {f}" for f, n in own.most_common(top)]
    lines.append("    total time (with callees):")
    lines += [f"      {n / samples:6.1%}  {f}" for f, n in total.most_common(top + 8)]
    return "\n".join(lines)


@contextlib.contextmanager
def recording(pid: int | None, directory: Path | None, name: str) -> Iterator[Profile | None]:
    spy = _py_spy()
    if pid is None or directory is None or spy is None:
        yield None
        return
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.txt"
    proc = subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--rate",
            "200",
            "--nonblocking",
            "--output",
            str(path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    profile = Profile(path)
    try:
        yield profile
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if path.exists():
            profile.summary = summarize(path)
