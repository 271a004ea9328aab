"""Training-step benchmark: genreclf's models against the reference's Keras models, on the same function.

    python benchmarks/train.py [--threads 2] [--rounds 3] [--steps 4] [--models gru transformer] [--ours ours ddp]

Needs the [bench] extra (tensorflow-cpu, tf-keras). For each model the Keras twin
(benchmarks/reference_keras.py) gets our weights and the outputs are checked to agree within
1e-5, then one training step (forward, weighted BCE, backward, Adam(1e-5)) on random log-mel
crops of batch 32 is timed for both: crops of 128, 192 and 256 frames and a mix of 8 lengths spread
evenly over 128-256 (one length per batch, as training draws them; the same for both). "ours" is one
process as `genreclf train` runs it (within lightning_modules.cpu_fit), "ddp" two single-threaded
processes sharing each batch of 32 with DDP's all-reduce. Ours and Keras
alternate, crop by crop, for --rounds rounds; per cell the fastest round counts (on a shared
machine, the one least disturbed by others). Prints samples/s and ours/Keras, and the machine.
Both run --threads intra-op threads (TensorFlow's inter-op pool too).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import multiprocessing as mp
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from genreclf.lightning_modules import TaggerModule, cpu_fit
from genreclf.losses import weighted_bce
from genreclf.models import GRUConfig, TransformerConfig

BATCH = 32
N_MELS, N_GENRES = 128, 163
CROPS = (128, 192, 256)
MIX = (128, 256)  # the random crop range of training
TARGET = 1.2  # ours / Keras samples per second, at least
PEER_TIMEOUT = datetime.timedelta(minutes=2)  # the "ddp" implementation's collectives
CONFIGS = {"gru": GRUConfig, "transformer": TransformerConfig}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform's guess)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def tf_version() -> str:
    """TensorFlow's version, without importing it."""
    for dist in ("tensorflow-cpu", "tensorflow"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


class Ours:
    """One genreclf model with the reference's optimiser and loss."""

    def __init__(self, kind: str, ddp: bool = False):
        torch.manual_seed(0)
        self.module = TaggerModule(CONFIGS[kind]())  # the reference's loss: BCE, positives weighted 4
        self.model = self.module.model.train()
        self.opt = self.module.configure_optimizers()["optimizer"]  # Adam(1e-5, eps 1e-7), fused on the CPU
        # DDP as Lightning wraps the model: gradients averaged over the processes in the backward pass.
        self.ddp = torch.nn.parallel.DistributedDataParallel(self.model) if ddp else None

    def step(self, x: np.ndarray, y: np.ndarray) -> None:
        self.opt.zero_grad(set_to_none=True)
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        if self.ddp is not None:
            loss = weighted_bce(self.ddp(x), y, 4.0)
        else:  # as training_step: within cpu_fit, a Transformer's batch in two halves side by side
            loss = self.module.batch_loss({"x": x, "y": y})
        loss.backward()
        self.opt.step()


class Keras:
    """The reference's Keras model, with our model's weights (checked: same outputs)."""

    def __init__(self, kind: str, threads: int):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import reference_keras as rk  # TensorFlow in this process only

        rk.set_threads(threads)  # before any TensorFlow op
        ours = Ours(kind).model.eval()  # the same seed: the same weights as the other process's
        self.model = rk.build(kind)
        rk.port_weights(ours, self.model, kind)
        x = np.random.default_rng(1).standard_normal((2, 200, N_MELS)).astype(np.float32)
        with torch.no_grad():
            p_ours = torch.sigmoid(ours(torch.from_numpy(x))).numpy()
        self.diff = float(np.abs(self.model(x, training=False).numpy() - p_ours).max())

    def step(self, x: np.ndarray, y: np.ndarray) -> None:
        self.model.train_on_batch(x, y)


def batches(lengths: list[int], seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random log-mel-like crops (batch 32, one length per batch) and multi-hot targets."""
    rng = np.random.default_rng(seed)
    return [
        (
            rng.standard_normal((BATCH, t, N_MELS)).astype(np.float32),
            (rng.random((BATCH, N_GENRES)) < 0.02).astype(np.float32),
        )
        for t in lengths
    ]


def _ddp_rank(kind: str, rank: int, port: int, conn) -> None:
    """One of the "ddp" implementation's 2 processes: single-threaded, its half of every batch of 32."""
    torch.set_num_threads(1)
    # A peer that dies makes the other's next collective fail within the timeout, rather than wait for 30 minutes.
    init = f"tcp://127.0.0.1:{port}"
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=PEER_TIMEOUT)
    runner = Ours(kind, ddp=True)
    with cpu_fit(runner.module):
        # Rank 0 takes the requests and hands them on; it times the steps of both, between barriers.
        while (msg := _broadcast(conn.recv() if rank == 0 else None)) is not None:
            data = batches(*msg)
            torch.distributed.barrier()
            t0 = time.perf_counter()
            for x, y in data:
                runner.step(x[rank::2], y[rank::2])
            torch.distributed.barrier()
            if rank == 0:
                conn.send(sum(len(x) for x, _ in data) / (time.perf_counter() - t0))
    torch.distributed.destroy_process_group()


def _broadcast(msg):
    box = [msg]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def worker(impl: str, kind: str, threads: int, conn) -> None:
    """Serve ("run", lengths, seed) -> samples/s for one implementation, in its own process."""
    # One framework per process: two thread pools in one process take turns badly (each
    # spins while the other works), and TensorFlow and PyTorch each bring their own oneDNN.
    if impl == "ddp":  # this process is rank 0 of 2; rank 1 is its child
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        other = mp.get_context("spawn").Process(target=_ddp_rank, args=(kind, 1, port, None), daemon=True)
        other.start()
        conn.send(0.0)
        _ddp_rank(kind, 0, port, conn)
        other.join()
        return
    torch.set_num_threads(threads)
    if impl == "keras":
        runner = Keras(kind, threads)
        conn.send(runner.diff)
    else:
        runner = Ours(kind)
        conn.send(0.0)
    # As genreclf's training does (TaggerModule.on_fit_start); TensorFlow has its own caching allocator.
    with cpu_fit(runner.module) if impl == "ours" else contextlib.nullcontext():
        while (msg := conn.recv()) is not None:
            lengths, seed = msg
            data = batches(lengths, seed)
            t0 = time.perf_counter()
            for x, y in data:
                runner.step(x, y)
            conn.send(sum(len(x) for x, _ in data) / (time.perf_counter() - t0))


def _answer(impl: str, conn) -> float:
    """Return a worker's next answer; if it died, stop with one line (its traceback is above)."""
    try:
        return conn.recv()
    except EOFError:
        raise SystemExit(f"the {impl!r} worker process died (its error is above)") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of both frameworks")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; the fastest counts")
    ap.add_argument("--steps", type=int, default=4, help="timed training steps per crop and round")
    ap.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument(
        "--ours",
        nargs="+",
        default=["ours", "ddp"],
        choices=["ours", "ddp"],
        help="ours: one process of --threads threads; ddp: 2 single-threaded processes sharing each batch",
    )
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    cases = {str(t): [t] * args.steps for t in CROPS}
    # Training's draw: every length of 128-256 as likely (mean 192). Shuffled: lengths of 129-192 cost the
    # Transformer's attention one 64-frame block less than 193-256, whatever their order.
    mix = np.linspace(MIX[0], MIX[1], max(args.steps, 8)).round().astype(int)
    cases["mix"] = [int(t) for t in rng.permutation(mix)]
    print(
        f"{cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, TensorFlow {tf_version()}; "
        f"{args.threads} threads each; batch {BATCH}, best of {args.rounds} rounds of {args.steps} steps",
        flush=True,
    )
    ctx = mp.get_context("spawn")
    results: dict[tuple[str, str], dict[str, float]] = {}
    for kind in args.models:
        conns = {}
        procs = []
        for impl in (*args.ours, "keras"):
            parent, child = ctx.Pipe()
            # Not daemonic: the "ddp" worker starts its second process itself.
            procs.append(ctx.Process(target=worker, args=(impl, kind, args.threads, child), daemon=impl != "ddp"))
            procs[-1].start()
            child.close()  # the worker's end is the worker's only: if it dies, recv() here fails instead of waiting
            conns[impl] = parent
        diff = max(_answer(impl, conn) for impl, conn in conns.items())
        if diff > 1e-5:
            raise SystemExit(f"{kind}: Keras and ours disagree by {diff:.2e} on the same weights")
        print(f"{kind}: Keras = ours within {diff:.1e} on the same weights", flush=True)
        warm = sorted(set(CROPS) | set(cases["mix"]))  # Keras traces each new length once
        for impl, conn in conns.items():
            conn.send((warm, 1))
            _answer(impl, conn)
        for r in range(args.rounds):
            for name, lengths in cases.items():
                for impl, conn in conns.items():  # one at a time: the other process waits, idle
                    conn.send((lengths, 100 + r))
                    best = results.setdefault((kind, name), {})
                    best[impl] = max(best.get(impl, 0.0), _answer(impl, conn))
        for conn in conns.values():
            conn.send(None)
        for proc in procs:
            proc.join()
    print(f"\n  {'model':<12} {'crop':>5} {'genreclf':<8} {'ours/s':>9} {'Keras/s':>9} {'ours/Keras':>11}")
    for (kind, name), best in results.items():
        for impl in args.ours:
            ratio = best[impl] / best["keras"]
            mark = "" if ratio >= TARGET else f"   (< {TARGET})"
            print(f"  {kind:<12} {name:>5} {impl:<8} {best[impl]:9.1f} {best['keras']:9.1f} {ratio:10.2f}x{mark}")


if __name__ == "__main__":
    main()
