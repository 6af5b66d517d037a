"""The built-in workload: a small GPT-style byte-level language model.

This is a compact re-telling of Andrej Karpathy's nanoGPT
(https://github.com/karpathy/nanoGPT, ``model.py``, MIT licence): token and position
embeddings, a stack of pre-LayerNorm transformer blocks (causal self-attention, then a
4x MLP with GELU), a final LayerNorm and a language-model head whose weight is tied to
the token embedding. Weights start from N(0, 0.02), with the residual output projections
scaled by 1/sqrt(2 * n_layer) as in GPT-2.

The vocabulary is the 256 byte values by default, so any text (or any file) is already tokenised;
pre-tokenized corpora (geotrain.worker.tokens) set ``vocab_size`` to their tokenizer's.
Attention uses ``F.scaled_dot_product_attention(..., is_causal=True)``, which picks a fused
kernel where the device has one. Nothing here names a device: move the model with
``model.to(device)`` and the inputs with it.

``build_model(config, seed)`` is the one way the rest of geotrain makes a model: the
weights are drawn on the CPU from a private RNG stream seeded with ``seed``, so every
process (and every site) that calls it with the same arguments holds bit-identical weights,
whichever device it trains on afterwards. That is what lets DiLoCo start every site from
the same point without shipping the initial weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the model. The defaults give a ~0.12 M-parameter model that trains on a CPU."""

    vocab_size: int = 256  # bytes
    block_size: int = 64  # longest context, in bytes
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must lie in [0, 1), got {self.dropout}")


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t sees only positions <= t."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # query, key and value for all heads in one matrix multiply
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # [B, T, C] -> [B, n_head, T, head_dim]
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: widen 4x, GELU, project back."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """One transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """The language model: bytes in, next-byte logits (and optionally the loss) out."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embedding
                wpe=nn.Embedding(config.block_size, config.n_embd),  # position embedding
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: the head reads out with the same matrix that embeds the bytes.
        self.transformer.wte.weight = self.lm_head.weight

        # Initialisation (draws from the global RNG; build_model seeds it privately).
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx: LongTensor [B, T] of byte values, T <= block_size.

        Returns (logits [B, T, vocab_size], loss), where loss is the mean cross-entropy of
        the logits against ``targets`` [B, T], or None when no targets are given.
        """
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(
                f"GPT.forward: a sequence of length {T} exceeds block_size {self.config.block_size}"
            )
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # [B, T, C] + [T, C]
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def num_params(self) -> int:
        """Number of trainable scalars; the tied embedding/head matrix counts once."""
        return sum(p.numel() for p in self.parameters())


def param_count(config: GPTConfig) -> int:
    """Parameters of :class:`GPT` of this shape, without building it (the head is tied to the embedding):
    embeddings V·C + T·C, per block 12·C² + 13·C (attention 4·C² + 4·C, MLP 8·C² + 5·C, two norms 4·C), final norm 2·C."""
    C = config.n_embd
    return config.vocab_size * C + config.block_size * C + config.n_layer * (12 * C * C + 13 * C) + 2 * C


def flops_per_token(config: GPTConfig, n_params: int) -> int:
    """Training FLOPs per token (forward and backward), PaLM's estimate as nanoGPT uses it for MFU:
    6·N for the weights plus 12·n_layer·n_embd·block_size for attention (N without the position table,
    which is a lookup, not a matrix multiply)."""
    n = n_params - config.block_size * config.n_embd
    return 6 * n + 12 * config.n_layer * config.n_embd * config.block_size


def build_model(config: GPTConfig, seed: int) -> GPT:
    """A fresh GPT on the CPU whose weights depend only on (config, seed).

    The draws happen inside ``torch.random.fork_rng``, so the caller's global RNG state is
    left exactly as it was, and the same (config, seed) yields the same weights in any process.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT(config)
    return model
