r"""A LightningModule written for one device, trained in 2 pipeline stages (``"pipeoptim"``).

The module is a small transformer classifier for scikit-learn's bundled 8x8 digits (each
image is a sequence of 8 rows of 8 pixels; nothing is downloaded). It has its own
``training_step`` / ``validation_step`` / ``test_step`` / ``predict_step``, a torchmetrics F1
score, a warm-up + cosine ``LambdaLR`` stepped per optimizer step and sized with
``trainer.estimated_stepping_batches``, and the Trainer has ``ModelCheckpoint`` on the F1,
``LearningRateMonitor``, a ``CSVLogger`` and gradient clipping. The only addition for the
pipeline is ``pipeline_stages()``::

    python examples/lightning_pipeline.py                  # 2 CPU processes, 1F1B, PipeOptim
    python examples/lightning_pipeline.py --devices 1      # the same module on one device
    python examples/lightning_pipeline.py --method pipedream
    python examples/lightning_pipeline.py --results benchmarks/results/lightning_example.json

``--results`` runs the 2-process pipeline and two single-device runs, on the same batches and
on batches of one micro-batch (each as a subprocess of this script), and writes them, with the
machine and the date, to the file the numbers in ``docs/lightning.md`` come from
(``--render FILE`` prints them as the docs show them). Run as a script, the strategy starts
the other process with Lightning's subprocess-script launcher (it re-runs this file).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassF1Score

import lightning_plugin
from predictopt.data import load_dataset


class WarmupCosine:
    """Learning-rate factor: linear warm-up, then cosine decay to 0 at ``total`` steps."""

    def __init__(self, total: int, warmup: int) -> None:
        self.total, self.warmup = total, max(1, warmup)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class DigitsTransformer(L.LightningModule):
    """Rows of an 8x8 image as 8 tokens, 2 encoder blocks, mean pooling, 10 classes."""

    def __init__(self, d_model: int = 32, lr: float = 3e-3, warmup: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Linear(8, d_model)
        self.position = nn.Parameter(torch.zeros(1, 8, d_model))
        self.block1 = nn.TransformerEncoderLayer(d_model, 4, 2 * d_model, dropout=0.0,
                                                 batch_first=True)
        self.block2 = nn.TransformerEncoderLayer(d_model, 4, 2 * d_model, dropout=0.0,
                                                 batch_first=True)
        self.head = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, 10))
        self.val_f1 = MulticlassF1Score(num_classes=10, average="macro")
        self.test_f1 = MulticlassF1Score(num_classes=10, average="macro")

    def tokens(self, x: Tensor) -> Tensor:
        return self.embed(x.view(-1, 8, 8)) + self.position

    def forward(self, x: Tensor) -> Tensor:
        h = self.block2(self.block1(self.tokens(x)))
        return self.head(h.mean(1))

    def pipeline_stages(self) -> list[nn.Module]:  # the one addition for the pipeline
        return [_Front(self), _Back(self)]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", (logits.argmax(-1) == y).float().mean())
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.val_f1.update(logits.argmax(-1), y)
        self.log("val/f1_macro", self.val_f1, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("test/acc", (logits.argmax(-1) == y).float().mean())
        self.test_f1.update(logits.argmax(-1), y)
        self.log("test/f1_macro", self.test_f1)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self(batch[0]).argmax(-1)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=1e-2)
        total = int(self.trainer.estimated_stepping_batches)  # optimizer steps of training
        self.total_steps = total
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, WarmupCosine(total, int(total * self.hparams.warmup)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class _Front(nn.Module):
    """Stage 0: embedding and the first block (the module's own layers)."""

    def __init__(self, m: DigitsTransformer) -> None:
        super().__init__()
        self.embed, self.block1 = m.embed, m.block1
        self.position = m.position

    def forward(self, x: Tensor) -> Tensor:
        return self.block1(self.embed(x.view(-1, 8, 8)) + self.position)


class _Back(nn.Module):
    """Stage 1: the second block and the head."""

    def __init__(self, m: DigitsTransformer) -> None:
        super().__init__()
        self.block2, self.head = m.block2, m.head

    def forward(self, h: Tensor) -> Tensor:
        return self.head(self.block2(h).mean(1))


class Timer(L.Callback):
    """Per-epoch metrics and times, kept on rank 0 (every rank logs the same values)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.epochs: list[dict[str, float]] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        m = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch, "seconds": time.perf_counter() - self.t0,
               **{k: float(m[k]) for k in ("train/loss", "val/loss", "val/f1_macro")}}
        self.epochs.append(row)
        print(f"epoch {row['epoch']}: train/loss {row['train/loss']:.4f}  val/loss "
              f"{row['val/loss']:.4f}  val/f1_macro {row['val/f1_macro']:.4f}  "
              f"({row['seconds']:.1f} s)", flush=True)


def data(batch_size: int) -> tuple[DataLoader, DataLoader, DataLoader]:
    ds = load_dataset("digits")
    n_train = 1088  # 17 batches of 64 (68 of 16); the rest of the training split validates
    train = TensorDataset(ds.x_train[:n_train], ds.y_train[:n_train])
    val = TensorDataset(ds.x_train[n_train:], ds.y_train[n_train:])
    test = TensorDataset(ds.x_test, ds.y_test)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True),
            DataLoader(val, batch_size=256), DataLoader(test, batch_size=256))


def run(args: argparse.Namespace) -> dict[str, object] | None:
    L.seed_everything(0, verbose=False)
    torch.set_num_threads(1)
    train, val, test = data(args.batch_size)
    model = DigitsTransformer(lr=args.lr)
    if args.devices == 1:
        strategy: object = "auto"
    else:
        strategy = lightning_plugin.PipeOptimStrategy(
            args.schedule, n_microbatches=args.microbatches, method=args.method)
    out = args.out or tempfile.mkdtemp(prefix="lightning_pipeline_")
    timer = Timer()
    ckpt = ModelCheckpoint(dirpath=os.path.join(out, "checkpoints"), monitor="val/f1_macro",
                           mode="max")
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=args.devices,
                        max_epochs=args.epochs, gradient_clip_val=1.0,
                        logger=CSVLogger(out, name="csv"), log_every_n_steps=5,
                        callbacks=[ckpt, LearningRateMonitor("step"), timer],
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(model, train, val)
    tested = trainer.test(model, test, verbose=False)[0]
    predicted = trainer.predict(model, test)
    if not trainer.is_global_zero:
        return None
    accuracy = float((torch.cat(predicted) == test.dataset.tensors[1]).float().mean())
    print(f"test: acc {tested['test/acc']:.4f}  f1_macro {tested['test/f1_macro']:.4f}  "
          f"(predict_step: acc {accuracy:.4f}); best val/f1_macro "
          f"{float(ckpt.best_model_score):.4f}", flush=True)
    return {"devices": args.devices, "batch_size": args.batch_size,
            "schedule": args.schedule if args.devices > 1 else None,
            "method": args.method if args.devices > 1 else None,
            "n_microbatches": args.microbatches if args.devices > 1 else None,
            "epochs": timer.epochs, "test": {k: float(v) for k, v in tested.items()},
            "predict_accuracy": accuracy, "best_val_f1_macro": float(ckpt.best_model_score),
            "estimated_stepping_batches": model.total_steps}


def write_results(path: str, argv: list[str]) -> None:
    """Run the pipeline and the single-device run; write both to ``path``."""
    runs = []
    batch = int(argv[argv.index("--batch-size") + 1]) if "--batch-size" in argv else 64
    micro = int(argv[argv.index("--microbatches") + 1]) if "--microbatches" in argv else 4
    # the pipeline; one device on the same batches; one device on the micro-batches (as many
    # optimizer steps as the pipeline makes updates, without staleness)
    for devices, size in ((2, batch), (1, batch), (1, batch // micro)):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            tmp = f.name
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--devices", str(devices),
               "--batch-size", str(size), "--json", tmp]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        with open(tmp) as f:
            run_ = json.load(f)
        run_["wall_seconds"] = round(time.perf_counter() - t0, 1)
        runs.append(run_)
        os.unlink(tmp)
    result = {
        "generated_by": "python examples/lightning_pipeline.py --results " + path,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "lightning": L.__version__,
                    "load_average": [round(v, 2) for v in os.getloadavg()]},
        "runs": runs,
    }
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"wrote {path}")


def render(result: dict[str, object]) -> str:
    """The text block of ``docs/lightning.md`` made from a ``--results`` file."""
    pipe, *single = result["runs"]  # type: ignore[misc]
    m = result["machine"]  # type: ignore[index]
    lines = [f"$ {result['generated_by']}",
             f"# {result['date']}, {m['platform']}, {m['cpus']} CPUs, load average "
             f"{m['load_average'][0]}, torch {m['torch']}, lightning {m['lightning']}",
             f"2 processes: {pipe['schedule']}, {pipe['method']}, {pipe['n_microbatches']} "
             f"micro-batches per batch of {pipe['batch_size']} "
             f"({pipe['estimated_stepping_batches']} optimizer updates per stage)"]
    for e in pipe["epochs"]:
        lines.append(f"epoch {e['epoch']}: train/loss {e['train/loss']:.4f}  val/loss "
                     f"{e['val/loss']:.4f}  val/f1_macro {e['val/f1_macro']:.4f}")
    for r in [pipe, *single]:
        where = "2 processes" if r["devices"] == 2 else f"1 device, batches of {r['batch_size']}"
        lines.append(f"{where}: test acc {r['test']['test/acc']:.4f}  f1_macro "
                     f"{r['test']['test/f1_macro']:.4f}  best val/f1_macro "
                     f"{r['best_val_f1_macro']:.4f}  ({r['estimated_stepping_batches']} "
                     f"steps, fit {r['epochs'][-1]['seconds']:.1f} s)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--schedule", default="1F1B")
    parser.add_argument("--method", default="pipeoptim")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", default=None, help="folder of the logs and checkpoints")
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--results", default=None,
                        help="run on 2 devices and on 1, write both to this JSON file")
    parser.add_argument("--render", default=None,
                        help="print the docs' text block of a --results file")
    args = parser.parse_args()
    if args.render:
        with open(args.render) as f:
            print(render(json.load(f)))
        return
    if args.results:
        skip = {"--results", args.results}
        write_results(args.results, [a for a in sys.argv[1:] if a not in skip])
        return
    result = run(args)
    if result is not None and args.json:
        with open(args.json, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
