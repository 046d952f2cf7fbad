"""Small classification data sets bundled with scikit-learn, and MLPs split into stages.

Only data that ships inside scikit-learn (``load_digits``, ``load_breast_cancer``, ``load_wine``,
``load_iris``) or is generated (``make_moons``) is used: nothing is downloaded. Features are
standardised with the training split's mean and standard deviation; the stratified train/test
split is fixed by the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["DATASETS", "Dataset", "load_dataset", "mlp_stages"]

#: Names accepted by :func:`load_dataset`.
DATASETS: tuple[str, ...] = ("digits", "breast_cancer", "wine", "iris", "moons")

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU}


@dataclass(frozen=True)
class Dataset:
    """A standardised classification data set split into train and test tensors.

    Attributes:
        name: The data set's name.
        x_train: ``float32`` features, shape ``(n_train, num_features)``.
        y_train: ``int64`` labels in ``0..num_classes-1``.
        x_test: Test features (standardised with the training statistics).
        y_test: Test labels.
        num_classes: Number of classes.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def num_features(self) -> int:
        """Number of input features."""
        return int(self.x_train.shape[1])


def load_dataset(name: str, *, test_fraction: float = 0.25, seed: int = 0,
                 moons_samples: int = 1000, moons_noise: float = 0.25) -> Dataset:
    """Load a bundled (or generated) data set, standardised and split.

    Args:
        name: One of :data:`DATASETS`: ``digits`` (1797 8x8 images, 10 classes),
            ``breast_cancer`` (569 x 30, 2 classes), ``wine`` (178 x 13, 3 classes), ``iris``
            (150 x 4, 3 classes), ``moons`` (``make_moons``, 2 features, 2 classes).
        test_fraction: Fraction of the samples held out for testing, in ``(0, 1)``.
        seed: Seed of the stratified split (and of the moons generator).
        moons_samples: Number of samples generated for ``moons``.
        moons_noise: Noise of ``moons``.

    Returns:
        A :class:`Dataset`.

    Raises:
        ValueError: unknown name or bad ``test_fraction``.
    """
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}; got {name!r}")
    if not isinstance(test_fraction, (int, float)) or not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    if name == "moons":
        x, y = datasets.make_moons(n_samples=moons_samples, noise=moons_noise, random_state=seed)
    else:
        loader = {"digits": datasets.load_digits, "breast_cancer": datasets.load_breast_cancer,
                  "wine": datasets.load_wine, "iris": datasets.load_iris}[name]
        x, y = loader(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed,
                                              stratify=y)
    x_tr = torch.tensor(x_tr, dtype=torch.float64)
    x_te = torch.tensor(x_te, dtype=torch.float64)
    mean, std = x_tr.mean(0), x_tr.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))  # constant pixels of digits
    return Dataset(
        name=name,
        x_train=((x_tr - mean) / std).float(),
        y_train=torch.tensor(y_tr, dtype=torch.long),
        x_test=((x_te - mean) / std).float(),
        y_test=torch.tensor(y_te, dtype=torch.long),
        num_classes=int(max(y.max(), 0)) + 1,
    )


def mlp_stages(in_dim: int, hidden: int, out_dim: int, num_stages: int, *,
               activation: str = "relu", seed: int | None = 0) -> list[nn.Module]:
    """An MLP of ``num_stages`` linear layers, one per stage.

    Stage 0 maps ``in_dim -> hidden``, the middle stages ``hidden -> hidden``, each followed by
    the activation; the last stage is a plain ``Linear(hidden, out_dim)`` (logits). With one
    stage the model is ``Linear(in_dim, out_dim)``.

    Args:
        in_dim: Input features.
        hidden: Hidden width.
        out_dim: Outputs (classes).
        num_stages: Number of stages (= linear layers), >= 1.
        activation: ``relu``, ``tanh``, ``gelu`` or ``silu``.
        seed: Seed of the initialisation (PyTorch's default init, drawn inside a forked RNG so
            the global RNG is untouched); ``None`` draws from the global RNG.

    Returns:
        The stage modules, first stage first.

    Raises:
        ValueError: non-positive sizes or an unknown activation.
    """
    for value, name in ((in_dim, "in_dim"), (hidden, "hidden"), (out_dim, "out_dim"),
                        (num_stages, "num_stages")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(_ACTIVATIONS)}; "
                         f"got {activation!r}")
    dims = [in_dim] + [hidden] * (num_stages - 1) + [out_dim]

    def build() -> list[nn.Module]:
        stages: list[nn.Module] = []
        for k in range(num_stages):
            layer = nn.Linear(dims[k], dims[k + 1])
            last = k == num_stages - 1
            stages.append(layer if last else nn.Sequential(layer, _ACTIVATIONS[activation]()))
        return stages

    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
