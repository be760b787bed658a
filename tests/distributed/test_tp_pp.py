"""TP=2, PP=2 and TP=2 x PP=2 reproduce the single-process loss with PoSE positions (4 gloo ranks)."""

import json

import pytest
from launch import torchrun


def test_tensor_and_pipeline_parallel_losses_match_single_process(tmp_path):
    out, ckpt = tmp_path / "losses.json", tmp_path / "ckpt"
    ckpt.mkdir()
    torchrun("tp_pp_worker.py", 4, str(out), str(ckpt))
    losses = json.loads(out.read_text())
    assert set(losses) == {"1,1", "2,1", "1,2", "2,2"}
    for layout, loss in losses.items():
        assert loss == pytest.approx(losses["1,1"], abs=1e-5), layout
