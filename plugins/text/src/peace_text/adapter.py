"""ONE-PEACE's L-adapter (spec §1.3): token ids -> [CLS; token embeddings] + learned positions.

Parameter names are fixed (the official-checkpoint converter maps onto them): ``token_embed``,
``cls_token``, ``pos_embed``, ``rel_pos_tables``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from peace_core.layers import embedding_lookup
from peace_core.rel_pos import gather_bucket_index, token_bucket_index, token_bucket_rows
from peace_registry.contract import AdapterOutput, BuildContext, RelativePositions
from peace_registry.errors import PeaceError
from peace_text.options import TextOptions

#: Token, CLS and position embeddings: trunc-normal(0, 0.02) cut at ±0.02 (spec §2.6).
EMBED_INIT_STD = 0.02

#: The batch key under which :meth:`TextAdapter.precompute` leaves the embedded sequence.
EMBEDDED_KEY = "embedded"


class TextBatchError(PeaceError, ValueError):
    """A text batch that the adapter cannot read (wrong keys, shapes, dtypes or ids)."""


class TextAdapter(nn.Module):
    """Token ids ``[B,L]`` (EOS included, padded with ``pad_id``) -> ``[B,1+L,D]`` tokens.

    ``tokens = [CLS; token_embed(ids)] + pos_embed(0..L)``; padding mask ``[False; ids == pad]``;
    relative positions: 1-D buckets of ``bucket_size`` over the whole sequence, CLS included.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        vocab_size: int = 50264,
        pad_id: int = 1,
        max_positions: int = 514,
        bucket_size: int = 256,
        num_bias_tables: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_bias_tables < 1:
            raise ValueError(f"num_bias_tables must be at least 1, got {num_bias_tables}")
        if not 0 <= pad_id < vocab_size:
            raise ValueError(f"pad_id {pad_id} is outside the vocabulary 0..{vocab_size - 1}")
        factory = {"device": device, "dtype": dtype}
        self.pad_id = pad_id
        self.bucket_size = bucket_size
        self.token_embed = nn.Embedding(vocab_size, dim, padding_idx=pad_id, **factory)
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim, **factory))
        self.pos_embed = nn.Embedding(max_positions, dim, **factory)
        rows = token_bucket_rows(bucket_size)
        self.rel_pos_tables = nn.ModuleList(
            nn.Embedding(rows, heads, **factory) for _ in range(num_bias_tables)
        )
        self.reset_parameters()

    @classmethod
    def from_context(cls, ctx: BuildContext) -> TextAdapter:
        options = ctx.options
        if not isinstance(options, TextOptions):
            raise TypeError(f"text adapter: expected TextOptions, got {type(options).__name__}")
        return cls(
            ctx.dim,
            ctx.heads,
            vocab_size=options.vocab_size,
            pad_id=options.pad_id,
            max_positions=options.max_positions,
            bucket_size=options.bucket_size,
            num_bias_tables=ctx.num_bias_tables,
            device=ctx.device,
            dtype=ctx.dtype,
        )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for weight in (self.token_embed.weight, self.cls_token, self.pos_embed.weight):
            nn.init.trunc_normal_(weight, std=EMBED_INIT_STD, a=-EMBED_INIT_STD, b=EMBED_INIT_STD)
        self.token_embed.weight[self.pad_id].zero_()
        for table in self.rel_pos_tables:
            nn.init.zeros_(table.weight)

    @property
    def max_positions(self) -> int:
        return self.pos_embed.num_embeddings

    @property
    def vocab_size(self) -> int:
        return self.token_embed.num_embeddings

    def _token_ids(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if "tokens" not in batch:
            raise TextBatchError(f"text batch lacks 'tokens' (has {sorted(batch)})")
        ids = batch["tokens"]
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
            shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise TextBatchError(f"text batch 'tokens' must be a [B, L] tensor, got {shape}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TextBatchError(f"text batch 'tokens' must hold integer ids, got {ids.dtype}")
        if ids.shape[1] + 1 > self.max_positions:
            raise TextBatchError(
                f"text of {ids.shape[1]} tokens plus CLS needs {ids.shape[1] + 1} positions, but "
                f"the position table has {self.max_positions} (max_positions); shorten the text "
                "(max_tokens) or use a model with more positions"
            )
        if ids.numel() and not ids.is_meta and not torch.compiler.is_compiling():
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.vocab_size:
                raise TextBatchError(
                    f"text batch 'tokens' holds ids {low}..{high}, outside the vocabulary "
                    f"0..{self.vocab_size - 1}: was it tokenized for another vocab_size?"
                )
        return ids.long()

    def _check_keep(self, keep: torch.Tensor, size: int, length: int) -> None:
        if keep.ndim != 2 or keep.shape[0] != size or keep.dtype != torch.long:
            raise TextBatchError(
                f"text keep must be a [B={size}, K] long tensor, got {keep.dtype} "
                f"{tuple(keep.shape)}"
            )
        if keep.numel() and not keep.is_meta and int(keep.min()) < -1:
            raise TextBatchError(
                f"text keep holds position {int(keep.min())}: positions are 0..{length - 1}, or -1 "
                "for padding"
            )
        if keep.numel() and not keep.is_meta and int(keep.max()) >= length:
            raise TextBatchError(
                f"text keep holds position {int(keep.max())}, but the sequence has {length} "
                "positions"
            )

    def forward(
        self, batch: Mapping[str, torch.Tensor], keep: torch.Tensor | None = None
    ) -> AdapterOutput:
        ids = self._token_ids(batch)
        size, length = ids.shape[0], ids.shape[1] + 1
        tokens = batch.get(EMBEDDED_KEY)
        if tokens is None:
            tokens = self._embed(ids)
        else:
            self._check_embedded(tokens, size, length)
        padding = torch.cat([ids.new_zeros(size, 1, dtype=torch.bool), ids == self.pad_id], dim=1)
        index = token_bucket_index(length, self.bucket_size).to(ids.device)
        if keep is not None:
            self._check_keep(keep, size, length)
            # Gather after embedding: kept tokens keep their original absolute and relative
            # positions (the denoising student sees only these).
            safe = keep.clamp(min=0)
            tokens = tokens.gather(1, safe[..., None].expand(-1, -1, tokens.shape[-1]))
            padding = padding.gather(1, safe) | (keep < 0)
            index = gather_bucket_index(index, keep)
        return AdapterOutput(tokens, padding, RelativePositions(index, list(self.rel_pos_tables)))

    def precompute(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch plus its embedded sequence (API 1.4). The views of a pretraining step then
        share one embedding lookup, so the backward builds one dense ``[vocab, D]`` gradient for
        ``token_embed`` instead of one per view (each as large as the table itself)."""
        return {**batch, EMBEDDED_KEY: self._embed(self._token_ids(batch))}

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """``[CLS; token_embed(ids)] + pos_embed(0..L)``: ``[B, L] -> [B, 1+L, D]``. The token
        table is large, so its lookup is core's ``embedding_lookup`` (a cheaper backward)."""
        size, length = ids.shape[0], ids.shape[1] + 1
        tokens = torch.cat(
            [self.cls_token.expand(size, 1, -1), embedding_lookup(self.token_embed, ids)], dim=1
        )
        return tokens + self.pos_embed.weight[:length]

    def _check_embedded(self, tokens: object, size: int, length: int) -> None:
        expected = (size, length, self.token_embed.embedding_dim)
        if not isinstance(tokens, torch.Tensor) or tuple(tokens.shape) != expected:
            got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens)
            raise TextBatchError(
                f"text batch {EMBEDDED_KEY!r} must be this adapter's precompute() output for the "
                f"batch's tokens, shape {list(expected)}; got {got}"
            )
