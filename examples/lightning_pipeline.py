r"""Train an MLP split into 4 pipeline stages with Lightning and ``strategy="pipeoptim"``.

The data are scikit-learn's bundled 8x8 digits (``load_digits``, nothing is downloaded); the
model is a 4-layer MLP, one layer per stage, one stage per process. Every batch is split into
micro-batches that flow through torch's 1F1B schedule; each stage updates its weights after
every micro-batch, on weights predicted by PipeOptim, inside the pipeline. Lightning runs the
loops, logging, validation and checkpoints::

    python examples/lightning_pipeline.py                      # 4 CPU processes, 1F1B
    python examples/lightning_pipeline.py --schedule ZBVZeroBubble --devices 2
    python examples/lightning_pipeline.py --method pipedream   # no prediction, to compare

Options: ``--devices``, ``--schedule``, ``--method``, ``--epochs``, ``--microbatches``,
``--batch-size``, ``--lr``. Run as a script, ``strategy="pipeoptim"`` starts the other
processes with Lightning's subprocess-script launcher (each re-runs this file).
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_plugin
from predictopt.data import load_dataset, mlp_stages


class DigitsMLP(lightning_plugin.PipelineModule):
    """A 64-128-128-128-10 MLP in 4 stages, AdamW with a per-update cosine schedule."""

    def __init__(self, num_stages: int = 4, hidden: int = 128, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.stages = nn.ModuleList(mlp_stages(64, hidden, 10, num_stages, seed=0))

    def pipeline_stages(self) -> nn.ModuleList:
        return self.stages

    def pipeline_loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output, target)

    def pipeline_metrics(self, output: Tensor, target: Tensor) -> dict[str, Tensor]:
        return {"acc": (output.argmax(-1) == target).float().mean()}

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=1e-2)
        # the strategy steps 'step' schedulers once per optimizer update (per micro-batch)
        updates = self.trainer.estimated_stepping_batches * self.trainer.strategy.updates_per_step
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(updates))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}


class EpochPrinter(L.Callback):
    """One line per epoch, from rank 0 (every rank holds the same logged values)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        m = trainer.callback_metrics
        print(f"epoch {trainer.current_epoch}: train_loss {float(m['train_loss']):.4f}  "
              f"val_loss {float(m['val_loss']):.4f}  val_acc {float(m['val_acc']):.4f}  "
              f"({time.perf_counter() - self.t0:.1f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--schedule", default="1F1B")
    parser.add_argument("--method", default="pipeoptim")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    L.seed_everything(0, verbose=False)
    ds = load_dataset("digits")
    train = DataLoader(TensorDataset(ds.x_train, ds.y_train), batch_size=args.batch_size,
                       shuffle=True, drop_last=True)  # the pipeline needs equal batches
    test = DataLoader(TensorDataset(ds.x_test, ds.y_test), batch_size=256)
    multi = args.schedule.lower() not in ("1f1b", "gpipe")
    model = DigitsMLP(num_stages=args.devices * (2 if multi else 1), lr=args.lr)

    strategy = lightning_plugin.PipeOptimStrategy(
        args.schedule, n_microbatches=args.microbatches, method=args.method)
    if args.schedule == "1F1B" and args.method == "pipeoptim" and args.microbatches == 8:
        strategy = "pipeoptim"  # the registered name: 1F1B, 2 x stages = 8 micro-batches
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=args.devices,
                        max_epochs=args.epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[EpochPrinter()])
    trainer.fit(model, train, test)
    results = trainer.test(model, test, verbose=False)
    if trainer.is_global_zero:
        # after fit every process's module holds the whole trained model
        with torch.no_grad():
            acc = (model.cpu()(ds.x_test).argmax(-1) == ds.y_test).float().mean()
        print(f"test (pipelined): loss {results[0]['test_loss']:.4f}  "
              f"acc {results[0]['test_acc']:.4f}")
        print(f"test (the gathered model on one device): acc {float(acc):.4f}")


if __name__ == "__main__":
    main()
