"""Multi-node training simulated on one machine: `torchrun --nnodes 2` started twice (node ranks 0 and 1, a
static rendezvous on 127.0.0.1) trains to the weights of one process on the whole batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import ColourSquares, make_trainer

WORKER = Path(__file__).with_name("multinode_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_equal_one_process(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1"}
    port = free_port()
    nodes = []
    for rank in (0, 1):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
            "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
            str(WORKER), str(tmp_path),
        ]  # fmt: skip
        nodes.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outputs = [p.communicate(timeout=400)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    trained = torch.load(tmp_path / "node0.pt", weights_only=True)
    single = make_trainer(tmp_path / "single", steps=3, batch_size=8, accum=2, dataset=ColourSquares(40))
    single.fit()
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=1e-4, atol=1e-5, msg=name)
