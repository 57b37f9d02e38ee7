#!/usr/bin/env python
"""One METR-LA-size training epoch through the product's Lightning path: epoch time.

``gpu_epoch.py`` times a hand-written step (the floor); this times what
``gman train`` runs: ``GMANDataModule`` (pinned-memory DataLoader) →
``GMANLightningModule`` (masked MAE, Adam, ``compile_mode``) → ``lightning.Trainer``
(``precision="bf16-mixed"`` on a GPU), so the two together show what Lightning's
loop costs.  The series are ``gpu_epoch.synthetic_series`` on the real METR-LA graph,
written as a PEMS-style ``.npz`` file that the data module reads like a user's file;
the split is 70/10/20, sized so that training has ``--windows`` windows (METR-LA:
23,974).  The spatial embedding is learnable (node2vec changes nothing in the step).

Variants (``--variants``, each a fresh module, two epochs, the second one timed —
the first one compiles):

* ``eager``: ``compile_mode`` None;
* ``compile``: ``compile_mode="default"``;
* ``compile-ro``: ``compile_mode="reduce-overhead"`` (CUDA graphs);
* ``compile-quiet``: ``compile`` with the training loss logged per epoch only.
  ``self.log(on_step=True, prog_bar=True)`` turns the loss into a Python number at
  every step, a host-device synchronisation; this variant measures its cost.

No validation (``limit_val_batches=0``): the timed part is the training loop only.

    python experiments/lightning_epoch.py --json lightning_epoch.json          # on the GPU machine
    python experiments/lightning_epoch.py --device cpu --windows 64 --layers 1 --variants eager   # smoke test

On the CPU each record also has ``peak_rss_mb``, the process's peak resident set
size after that variant (``gman train``'s allocator setting applied, as there).

Needs torch, lightning, pandas; no MLflow.
"""
from __future__ import annotations

import argparse
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

import gpu_epoch  # this folder: the synthetic series, the graph default, variant handling, reporting

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"eager": None, "compile": "default", "compile-ro": "reduce-overhead", "compile-quiet": "default"}
SPLIT = (0.7, 0.1, 0.2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    gpu_epoch.add_epoch_arguments(p)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--variants", default=None,
                   help=f"comma list of {', '.join(VARIANTS)} (default: eager,compile,compile-quiet on cuda, eager on cpu)")
    p.add_argument("--max-steps", type=int, default=None, help="cap each epoch at this many batches")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    args = p.parse_args(argv)
    for name in ("windows", "batch", "layers", "heads", "head_dim"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.max_steps is not None and args.max_steps < 1:
        p.error("--max-steps must be positive")
    if args.variants is not None:
        args.variants = gpu_epoch.parse_variants(p, args.variants, VARIANTS)
    return args


def write_series(path: Path, graph: Path, windows: int, history: int, horizon: int, seed: int) -> tuple[list[str] | None, int]:
    """Synthetic speeds on ``graph`` as ``path`` (.npz, data [T, N, 1]) -> (the graph's sensor ids, or
    None for a bare matrix, T)."""
    import numpy as np

    from gman.data.graph import load_adjacency

    adjacency, sensor_ids = load_adjacency(graph)
    # the training part is the first 70 % of the steps; it must hold `windows` windows
    num_steps = math.ceil((windows + history + horizon - 1) / SPLIT[0]) + 1
    num_steps = max(num_steps, math.ceil((history + horizon) / min(SPLIT)) + 1)  # every part holds a window
    values = gpu_epoch.synthetic_series(adjacency, num_steps, seed).numpy()
    np.savez(path, data=values[:, :, None].astype("float32"))
    return (None if sensor_ids is None else [str(s) for s in sensor_ids]), num_steps


def run_variant(args, variant: str, data_options: dict, accelerator: str) -> dict:
    import lightning as L
    import torch

    from gman.data.datamodule import GMANDataModule
    from gman.training.module import GMANLightningModule

    class QuietModule(GMANLightningModule):
        """The training loss logged per epoch only: no per-step conversion to a Python number."""

        def log(self, name, value, *args, **kwargs):
            if name == "train_mae":
                kwargs.update(on_step=False, prog_bar=False)
            super().log(name, value, *args, **kwargs)

    cuda = accelerator == "gpu"
    times: list[float] = []
    steps: list[int] = []

    class EpochTimer(L.Callback):
        def _sync(self):
            if cuda:
                torch.cuda.synchronize()

        def on_train_epoch_start(self, trainer, pl_module):
            self._sync()
            self.t0, self.first_step = time.perf_counter(), trainer.global_step

        def on_train_epoch_end(self, trainer, pl_module):
            self._sync()
            times.append(time.perf_counter() - self.t0)
            steps.append(trainer.global_step - self.first_step)

    L.seed_everything(args.seed, verbose=False)
    datamodule = GMANDataModule(**data_options)
    cls = QuietModule if variant == "compile-quiet" else GMANLightningModule
    module = cls(num_layers=args.layers, num_heads=args.heads, head_dim=args.head_dim, dropout=0.0,
                 compile_mode=VARIANTS[variant])
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, precision="bf16-mixed" if cuda else "32-true", max_epochs=2,
        limit_train_batches=args.max_steps or 1.0, limit_val_batches=0, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_model_summary=False, callbacks=[EpochTimer()],
        default_root_dir=tempfile.mkdtemp(prefix="lightning_epoch_"),
    )
    trainer.fit(module, datamodule=datamodule)
    record = {"variant": variant, "compile_mode": VARIANTS[variant], "first_epoch_s": round(times[0], 3),
              "epoch_s": round(times[1], 3), "steps": steps[1], "step_ms": round(1e3 * times[1] / steps[1], 3),
              "windows_per_s": round(steps[1] * args.batch / times[1], 1)}
    full = len(datamodule.train_dataloader())
    record["train_windows"] = len(datamodule.train_dataloader().dataset)
    record["epoch_s_all_batches"] = round(times[1] * full / steps[1], 3)
    if cuda:
        record["gpu_peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:  # the process's peak so far: with several variants, the largest of those run up to here
        record["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return record


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path[:0] = [str(ROOT), str(ROOT / "experiments")]
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("lightning_epoch: --device cuda but CUDA is not available")
    graph = args.graph or gpu_epoch.default_graph()
    if not graph.is_file():
        sys.exit(f"lightning_epoch: {graph} does not exist (--graph)")
    variants = args.variants or (["eager", "compile", "compile-quiet"] if args.device == "cuda" else ["eager"])
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        from gman.allocator import keep_freed_memory

        keep_freed_memory()  # as `gman train` does
    result = {"graph": str(graph), "windows": args.windows, "batch": args.batch, "layers": args.layers,
              "heads": args.heads, "head_dim": args.head_dim, "device": args.device,
              "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "variants": []}
    with tempfile.TemporaryDirectory() as tmp:
        series = Path(tmp) / "metr-la-synthetic.npz"
        sensor_ids, num_steps = write_series(series, graph, args.windows, 12, 12, args.seed)
        data_options = dict(dataset=str(series), graph_path=str(graph), start_time="2012-03-01",
                            interval="5min", options={"sensor_ids": sensor_ids} if sensor_ids else None,
                            split=list(SPLIT), batch_size=args.batch, seed=args.seed)
        result["steps_in_series"] = num_steps
        accelerator = "gpu" if args.device == "cuda" else "cpu"
        result["variants"] = gpu_epoch.run_variants(
            variants, lambda variant: run_variant(args, variant, data_options, accelerator))
    gpu_epoch.report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
