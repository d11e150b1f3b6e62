"""Scale-out through PyTorch's DDP: two CPU processes (gloo) train one model and agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import MICRO_VISION, preset_args


def test_two_process_ddp_ranks_agree(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "freedeploy", "train", "--device", "cpu", "--exits", "2", "--finetune-epochs", "1",
           "--exit-epochs", "1", "--out", str(out), "--json", "--no-progress", *preset_args(MICRO_VISION)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    digests = metrics["ddp"]["rank_weight_digests"]
    assert metrics["ddp"]["world_size"] == 2 and len(digests) == 2 and digests[0] == digests[1]
    assert not [p for p in tmp_path.iterdir() if p.name != "ddp"], "only rank 0 writes"
