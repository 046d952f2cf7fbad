r"""The language-model yardstick: a character-level corpus and a small transformer cut into stages.

The default corpus is the English text of Python's own help topics (the ``pydoc_data.topics``
module of the standard library, about 460 kB: reference documentation prose with code
examples), so it is on every machine that runs Python and nothing is downloaded; any UTF-8 text
file can be used instead (:func:`load_text`). Tokens are the distinct characters of the corpus;
the last ``val_fraction`` of the text is held out.

The model (:func:`lm_stages`) is a pre-norm decoder-only transformer: stage 0 embeds the tokens
and positions, every stage runs one block (causal self-attention and an MLP, residual), the last
stage adds a final LayerNorm and the output head. :func:`lm_loss` is the mean next-token
cross-entropy in nats.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DEFAULT_CORPUS",
    "TextData",
    "TransformerStage",
    "load_text",
    "lm_loss",
    "lm_stages",
]

#: Name of the default corpus (Python's help topics, ``pydoc_data.topics``).
DEFAULT_CORPUS = "pydoc-topics"


@dataclass(frozen=True)
class TextData:
    """A character-level corpus split into a training and a held-out token stream.

    Attributes:
        name: The corpus name (``"pydoc-topics"`` or the file's path).
        train: ``int64`` token ids of the training text.
        val: ``int64`` token ids of the held-out text (the end of the corpus).
        vocab: The characters, in token-id order.
    """

    name: str
    train: Tensor
    val: Tensor
    vocab: str

    @property
    def vocab_size(self) -> int:
        """Number of distinct tokens."""
        return len(self.vocab)

    def batch(self, generator: torch.Generator, size: int, context: int) -> tuple[Tensor, Tensor]:
        """``size`` random windows of the training stream: inputs and next-token targets,
        ``(size, context)`` each, drawn with ``generator``."""
        starts = torch.randint(0, len(self.train) - context - 1, (size,), generator=generator)
        idx = starts[:, None] + torch.arange(context + 1)[None, :]
        win = self.train[idx]
        return win[:, :-1], win[:, 1:]

    def held_out(self, size: int, context: int, *, seed: int = 1234) -> tuple[Tensor, Tensor]:
        """A fixed set of ``size`` windows of the held-out stream (the same for every run with
        the same ``seed``)."""
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(self.val) - context - 1, (size,), generator=gen)
        idx = starts[:, None] + torch.arange(context + 1)[None, :]
        win = self.val[idx]
        return win[:, :-1], win[:, 1:]


def _default_text() -> str:
    try:
        from pydoc_data import topics
    except ImportError as exc:  # pragma: no cover - every CPython ships it
        raise RuntimeError("the default corpus is Python's pydoc_data.topics, which this Python "
                           "lacks; pass a text file (path=...)") from exc
    return "\n".join(topics.topics[k] for k in sorted(topics.topics))


def load_text(path: str | Path | None = None, *, val_fraction: float = 0.1) -> TextData:
    """Load a corpus as character tokens and split it.

    Args:
        path: A UTF-8 text file, or ``None`` for the default corpus (:data:`DEFAULT_CORPUS`).
        val_fraction: Fraction of the text, at its end, held out; in ``(0, 0.5]``.

    Returns:
        A :class:`TextData`.

    Raises:
        ValueError: a bad ``val_fraction``, or a text too short to split.
        FileNotFoundError: ``path`` does not exist.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not (
            0 < val_fraction <= 0.5):
        raise ValueError(f"val_fraction must be in (0, 0.5], got {val_fraction!r}")
    if path is None:
        text, name = _default_text(), DEFAULT_CORPUS
    else:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"corpus file not found: {p}")
        text, name = p.read_text(encoding="utf-8"), str(p)
    vocab = "".join(sorted(set(text)))
    lut = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([lut[c] for c in text], dtype=torch.long)
    cut = int(len(ids) * (1 - val_fraction))
    if cut < 1024 or len(ids) - cut < 1024:
        raise ValueError(f"the corpus is too short ({len(ids)} characters): both splits need at "
                         "least 1024 characters")
    return TextData(name=name, train=ids[:cut], val=ids[cut:], vocab=vocab)


class _Block(nn.Module):
    """Pre-norm causal self-attention and MLP, each residual (dropout after each, if any)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), is_causal=True)
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.mlp(self.ln2(x)))


class TransformerStage(nn.Module):
    """One transformer block; the first stage also embeds, the last also normalises and
    projects to the vocabulary."""

    def __init__(self, *, first: bool, last: bool, vocab_size: int, dim: int, heads: int,
                 context: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim) if first else None
        self.pos = nn.Parameter(0.02 * torch.randn(context, dim)) if first else None
        self.block = _Block(dim, heads, dropout)
        self.norm = nn.LayerNorm(dim) if last else None
        self.head = nn.Linear(dim, vocab_size) if last else None

    def forward(self, x: Tensor) -> Tensor:
        if self.tok is not None:
            x = self.tok(x) + self.pos[: x.shape[1]]
        x = self.block(x)
        if self.head is not None:
            x = self.head(self.norm(x))
        return x


def lm_stages(num_stages: int, vocab_size: int, *, dim: int = 96, heads: int = 4,
              context: int = 64, dropout: float = 0.0, seed: int | None = 0
              ) -> list[nn.Module]:
    """A transformer language model of ``num_stages`` blocks, one per stage.

    Args:
        num_stages: Blocks = stages, >= 1.
        vocab_size: Tokens.
        dim: Model width (divisible by ``heads``).
        heads: Attention heads.
        context: Longest sequence (positions embedded).
        dropout: Dropout after attention and MLP.
        seed: Seed of the initialisation (in a forked RNG: the global RNG is untouched);
            ``None`` draws from the global RNG.

    Raises:
        ValueError: non-positive sizes, ``dim`` not divisible by ``heads``, or ``dropout``
            outside ``[0, 1)``.
    """
    for value, name in ((num_stages, "num_stages"), (vocab_size, "vocab_size"), (dim, "dim"),
                        (heads, "heads"), (context, "context")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if dim % heads:
        raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not (
            0 <= dropout < 1):
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")

    def build() -> list[nn.Module]:
        return [TransformerStage(first=k == 0, last=k == num_stages - 1, vocab_size=vocab_size,
                                 dim=dim, heads=heads, context=context, dropout=dropout)
                for k in range(num_stages)]

    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def lm_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Mean next-token cross-entropy (nats) of ``(batch, time, vocab)`` logits."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
