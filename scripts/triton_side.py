"""Run the same calls against real Triton (the anchor kit in ../shared/anchors/triton) and against
inferd on one repository, one server at a time, and print where the answers differ.

Used by compare_triton_streams.py and compare_triton_python.py; Triton is the ground truth.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness import ServerProcess, free_port  # noqa: E402

ANCHOR = ROOT.parent / "shared" / "anchors" / "triton"
Run = Callable[[str, str], dict]  # (grpc url, http url) -> {case name: answer}


def side_by_side(repo: Path, run: Run, known: dict[str, str]) -> int:
    """0 when every case answers the same or differs on purpose (``known``: case-name prefix -> why)."""
    ports = [free_port() for _ in range(3)]
    env = {**os.environ, "TRITON_LOG": str(repo.parent / "triton.log")}
    started = subprocess.run(["bash", str(ANCHOR / "start.sh"), str(repo), *map(str, ports)],
                             capture_output=True, text=True, env=env)
    if started.returncode != 0:
        print("Triton did not start (run ../shared/anchors/triton/setup.sh once):", started.stderr[-2000:])
        return 2
    pid = int(started.stdout.strip().splitlines()[-1])
    try:
        triton = run(f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}")
    finally:
        subprocess.run(["kill", str(pid)])
    proc = ServerProcess([repo]).start(repo.parent / "inferd.log")
    try:
        inferd = run(proc.grpc_url, proc.http_url)
    finally:
        proc.stop()
    same = differ = purpose = 0
    for name in triton:
        if triton[name] == inferd[name]:
            same += 1
            print(f"{'same':10} {name}")
            continue
        why = next((why for key, why in known.items() if name == key or name.startswith(key + " ")), None)
        if why is not None:
            purpose += 1
            print(f"{'on purpose':10} {name}: {why}")
            continue
        differ += 1
        print(f"{'DIFFERENT':10} {name}")
        print("   triton:", json.dumps(triton[name], default=str)[:1500])
        print("   inferd:", json.dumps(inferd[name], default=str)[:1500])
    print(f"{same} of {len(triton)} cases answer the same, {purpose} differ on purpose, {differ} differ")
    return 1 if differ else 0
