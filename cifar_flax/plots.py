"""Figures: a run's accuracy and loss curves, and a study's comparison."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display.
import matplotlib.pyplot as plt  # noqa: E402


def _series(history: dict, key: str):
  epochs = [r["epoch"] for r in history["epochs"]]
  return epochs, [r[key] for r in history["epochs"]]


def plot_curves(history: dict, path: Path) -> Path:
  """Like the original: accuracy on the left, loss on the right, train and test."""
  fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
  for split, style in (("train", "-o"), ("test", "-s")):
    acc_ax.plot(*_series(history, f"{split}_accuracy"), style, label=f"{split}", markersize=3)
    loss_ax.plot(*_series(history, f"{split}_loss"), style, label=f"{split}", markersize=3)
  acc_ax.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
  loss_ax.set(xlabel="epoch", ylabel="loss", title="Loss")
  for ax in (acc_ax, loss_ax):
    ax.grid(alpha=0.3)
    ax.legend()
  status = "" if history.get("status") != "diverged" else " (diverged)"
  fig.suptitle(f"{history['network']} - {history['protocol']} protocol{status}")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return Path(path)


def plot_study(title: str, members: list[tuple[str, dict]], path: Path) -> Path:
  """Test accuracy and test loss per epoch, one line per value (label, history),
  with a dot where each member stops. Shorter runs lie on top, so members that
  are prefixes of one run (the epochs study) stay visible on the longest one."""
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  drawn = [(label, history) for label, history in members if history.get("epochs")]
  for ax, key in zip(axes, ("test_accuracy", "test_loss")):
    for label, history in drawn:
      epochs, values = _series(history, key)
      # Shorter runs on top (zorder in (2, 3]); the legend keeps the members' order.
      line, = ax.plot(epochs, values, "-o", markersize=2.5, zorder=2 + 1 / len(epochs), label=label)
      ax.plot(epochs[-1:], values[-1:], "o", markersize=7, color=line.get_color(), zorder=4)
  for ax, name in zip(axes, ("test accuracy", "test loss")):
    ax.set(xlabel="epoch", ylabel=name, title=name.capitalize())
    ax.grid(alpha=0.3)
    if drawn:
      ax.legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return Path(path)
