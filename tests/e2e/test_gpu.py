"""The CUDA paths: learner engines on a GPU, weight broadcast into GPU tensors, and `opd run` with every model on
the GPU. CI has no GPU, so these skip there; they run on a lent GPU machine (see README, "GPU status")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from learner.batching import collate
from learner.engines.torch import TorchEngine
from opd.config import load_config
from tests.conftest import REPO, free_port, opd_run
from tests.scored import scored_trajectories, tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no GPU on this machine)"),
]

BASE = ["learner.warmup_steps=0", "learner.lr=1e-2", "learner.batch_size=8", "scorer.topk=4"]


@pytest.fixture
def exact_fp32():
    """TF32 matmuls would make the GPU's fp32 differ from the CPU's by ~1e-3; this compares arithmetic, not TF32."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _params(model) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1).cpu() for p in model.parameters()])


@pytest.mark.parametrize("loss", ["reverse_kl_pg", "gkd_jsd", "hybrid"])
def test_torch_engine_on_cuda_matches_cpu(loss, exact_fp32):
    results = {}
    for device in ("cpu", "cuda"):
        cfg = load_config(None, BASE + [f"learner.loss={loss}", f"learner.device={device}"])
        model = tiny_model(0, torch.float32).to(device)
        engine = TorchEngine(model, cfg)
        recs = [engine.step(collate(scored_trajectories(8, seed=s), 0, device)) for s in range(3)]
        results[device] = (recs, _params(model))
    for got, want in zip(results["cuda"][0], results["cpu"][0], strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4, abs=1e-6)
    torch.testing.assert_close(results["cuda"][1], results["cpu"][1], rtol=1e-4, atol=1e-4)


def _run_isolated(code: str, timeout: float = 300) -> str:
    """DeepSpeed owns the default process group; each case gets a fresh interpreter."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_bf16_on_cuda_tracks_the_fp32_torch_engine(stage):
    """ZeRO `stage` in bf16 on one GPU (NCCL default group): the same steps as the fp32 torch engine, within bf16
    rounding. Weights are compared by their update from the start: bf16 holds a weight near 1 only to ~4e-3, so
    the weights themselves differ by about as much as a few steps move them."""
    out = _run_isolated(
        f"""
        import json, torch
        from learner.batching import collate
        from learner.engines.torch import TorchEngine
        from learner.engines.deepspeed import DeepSpeedEngine
        from opd.config import load_config
        from tests.scored import scored_trajectories, tiny_model
        base = {BASE!r} + ["learner.loss=hybrid", "learner.device=cuda"]
        cfg = load_config(None, base + ["learner.engine=deepspeed", "learner.deepspeed.zero_stage={stage}"])
        model = tiny_model(0, torch.float32).cuda()
        engine = DeepSpeedEngine(model, cfg)
        ref_model = tiny_model(0, torch.float32).cuda()
        ref = TorchEngine(ref_model, load_config(None, base))
        got, want = [], []
        for s in range(4):
            got.append(engine.step(collate(scored_trajectories(8, seed=s), 0, "cuda"))["loss"])
            want.append(ref.step(collate(scored_trajectories(8, seed=s), 0, "cuda"))["loss"])
        with engine.gathered():
            w = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
            dtypes = sorted({{str(p.dtype) for p in model.parameters()}})
        r = torch.cat([p.detach().reshape(-1) for p in ref_model.parameters()])
        init = torch.cat([p.detach().reshape(-1) for p in tiny_model(0, torch.float32).parameters()]).cuda()
        init16 = init.bfloat16().float()
        d_ds, d_ref = w - init16, r.bfloat16().float() - init16
        cos = float(torch.nn.functional.cosine_similarity(d_ds, d_ref, dim=0))
        rel = float((d_ds.norm() - d_ref.norm()).abs() / d_ref.norm())
        print(json.dumps({{"got": got, "want": want, "dtypes": dtypes, "cos": cos, "rel": rel,
                          "skipped": engine.skipped_steps}}))
        """
    )
    res = json.loads(out.strip().splitlines()[-1])
    assert res["skipped"] == 0
    assert res["dtypes"] == ["torch.bfloat16"]
    for g, w in zip(res["got"], res["want"], strict=True):
        assert g == pytest.approx(w, rel=5e-2, abs=5e-3)
    # the bf16 updates follow the fp32 ones (H100: cos 0.968, norms 15% apart at ZeRO-0, whose bf16 optimiser
    # path differs; closer at ZeRO-1..3)
    assert res["cos"] > 0.95 and res["rel"] < 0.25, res


def test_weight_broadcast_lands_in_cuda_tensors():
    """Learner process (rank 0, CUDA params) -> actor process (CUDA params), the backend `auto` picks for one GPU
    (gloo; NCCL refuses two ranks on one device), bucketed, bit-exact."""
    from weight_sync import resolve_backend

    backend = resolve_backend("auto", "cuda", "cuda")
    assert backend == "gloo"
    port = free_port()
    code = """
        import sys, torch
        from weight_sync import Signer, WeightBroadcaster, WeightReceiver, make_group, make_store
        rank, port, backend = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
        torch.manual_seed(0)
        shapes = [(256, 256), (256,), (1000, 33), (7,)]
        src = [torch.randn(s, device="cuda") for s in shapes]
        store = make_store("127.0.0.1", port, rank, 2, 60)
        group = make_group(store, "w", rank, 2, backend, 60, Signer("the test's weight-sync secret"), "127.0.0.1")
        if rank == 0:
            WeightBroadcaster(group, [(f"p{i}", t) for i, t in enumerate(src)], 0.1).broadcast(1)
        else:
            dst = [torch.zeros(s, device="cuda") for s in shapes]
            WeightReceiver(group, [(f"p{i}", t) for i, t in enumerate(dst)], 0.1).receive(1)
            assert all(torch.equal(a, b) for a, b in zip(src, dst)), "weights differ"
            print("OK", dst[0].device)
    """
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), str(r), str(port), backend],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert "OK cuda:0" in outs[1]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two GPUs for two ranks")
def test_nccl_backend_is_chosen_for_separate_gpus():
    from weight_sync import resolve_backend

    assert resolve_backend("auto", "cuda:0", "cuda:1") == "nccl"


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_opd_run_with_every_model_on_the_gpu(engine, prepared, tmp_path):
    """The demo with learner, actor and teacher scorer on CUDA: it trains, and every actor weight digest equals
    the learner's (the broadcast into GPU tensors is exact, also from DeepSpeed's bf16 learner)."""
    out_dir = tmp_path / "run"
    proc = opd_run(
        prepared,
        out_dir,
        "learner.max_steps=40",
        "learner.eval_every=20",
        "learner.device=cuda",
        "actor.device=cuda",
        "scorer.device=cuda",
        f"learner.engine={engine}",
        "weight_sync.verify_digests=true",
    )
    log, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, log[-5000:]
    s = json.loads((out_dir / "summary.json").read_text())
    assert s["learner_steps"] == 40 and s["weight_version"] == 39
    assert s["student_accuracy_after"] > s["student_accuracy_before"]
    assert s["reverse_kl_last"] < s["reverse_kl_first"]
    digests = {}
    for f in (out_dir / "weight_digests").glob("*.jsonl"):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            digests.setdefault(r["version"], {})[f.stem] = r["sha256"]
    both = [v for v, d in digests.items() if "learner" in d and len(d) > 1]
    assert both, digests
    for v in both:
        assert len(set(digests[v].values())) == 1, (v, digests[v])
