"""Zero-shot retrieval metrics: recall at K in both directions (spec §5.2).

Items (images, sounds, ...) and texts are compared by the dot product of their L2-normalised
embeddings. Each text belongs to exactly one item (``text_owner``); an item may own several texts
(COCO has five captions per image).

* item -> text R@K: the share of items that have *any* of their texts among the K most similar;
* text -> item R@K: the share of texts whose item is among the K most similar items.

Ties count against the query: a negative scoring exactly as high as the best positive ranks ahead
of it, so a model that scores everything the same gets R@K = 0, never a flattering 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from math import comb

import torch

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)
#: Rows of the similarity matrix held at once (keeps memory flat for big test sets).
_CHUNK_ROWS = 1024


class RetrievalInputError(ValueError):
    """Embeddings or owners that cannot be scored."""


@dataclass
class RetrievalResult:
    """Recall at each K in both directions, with the chance level of each."""

    num_items: int
    num_texts: int
    item_to_text: dict[int, float]
    text_to_item: dict[int, float]
    chance_item_to_text: dict[int, float] = field(default_factory=dict)
    chance_text_to_item: dict[int, float] = field(default_factory=dict)

    @property
    def mean_recall(self) -> float:
        """The mean of every recall (``r_mean`` of the official evaluation)."""
        values = [*self.item_to_text.values(), *self.text_to_item.values()]
        return sum(values) / len(values) if values else float("nan")

    def to_dict(self) -> dict[str, object]:
        return {
            "items": self.num_items,
            "texts": self.num_texts,
            "item_to_text": {f"R@{k}": v for k, v in self.item_to_text.items()},
            "text_to_item": {f"R@{k}": v for k, v in self.text_to_item.items()},
            "r_mean": self.mean_recall,
            "chance": {
                "item_to_text": {f"R@{k}": v for k, v in self.chance_item_to_text.items()},
                "text_to_item": {f"R@{k}": v for k, v in self.chance_text_to_item.items()},
            },
        }


def _check_inputs(
    item_embeddings: torch.Tensor, text_embeddings: torch.Tensor, text_owner: torch.Tensor
) -> None:
    if item_embeddings.ndim != 2 or text_embeddings.ndim != 2:
        raise RetrievalInputError(
            f"embeddings must be [N,D]; got items {tuple(item_embeddings.shape)} and texts "
            f"{tuple(text_embeddings.shape)}"
        )
    if item_embeddings.shape[1] != text_embeddings.shape[1]:
        raise RetrievalInputError(
            f"items have width {item_embeddings.shape[1]} but texts {text_embeddings.shape[1]}"
        )
    check_owners(text_owner, item_embeddings.shape[0], text_embeddings.shape[0])


def check_owners(text_owner: torch.Tensor, num_items: int, num_texts: int) -> None:
    """Every text must name an existing item; every item needs at least one text."""
    if text_owner.ndim != 1 or text_owner.shape[0] != num_texts:
        raise RetrievalInputError(
            f"text_owner must be [M] with M = {num_texts} texts, got {tuple(text_owner.shape)}"
        )
    if text_owner.dtype not in (torch.int64, torch.int32):
        raise RetrievalInputError(f"text_owner must hold integer ids, got {text_owner.dtype}")
    if num_items == 0 or num_texts == 0:
        raise RetrievalInputError(
            f"retrieval needs at least one item and one text (got {num_items} and {num_texts})"
        )
    if int(text_owner.min()) < 0 or int(text_owner.max()) >= num_items:
        raise RetrievalInputError(
            f"text_owner ids must lie in [0, {num_items}); found {int(text_owner.min())}.."
            f"{int(text_owner.max())}"
        )
    owned = torch.bincount(text_owner.long(), minlength=num_items)
    orphans = (owned == 0).nonzero().flatten()
    if len(orphans):
        raise RetrievalInputError(
            f"{len(orphans)} item(s) have no text (first: item {int(orphans[0])}); drop them or "
            "give each item at least one caption"
        )


def item_to_text_ranks(similarity: torch.Tensor, text_owner: torch.Tensor) -> torch.Tensor:
    """For each item (row), how many other items' texts score at least as high as its best text.

    ``similarity`` is ``[N items, M texts]``; returns ``[N]`` long (0 = a positive ranks first).
    """
    owner = text_owner.long().to(similarity.device)
    num_items = similarity.shape[0]
    ranks = []
    for start in range(0, num_items, _CHUNK_ROWS):
        rows = similarity[start : start + _CHUNK_ROWS]
        ids = torch.arange(start, start + rows.shape[0], device=similarity.device)
        positive = owner[None, :] == ids[:, None]  # [n, M]
        best = rows.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
        ranks.append(((rows >= best) & ~positive).sum(dim=1))
    return torch.cat(ranks)


def text_to_item_ranks(similarity: torch.Tensor, text_owner: torch.Tensor) -> torch.Tensor:
    """For each text (column), how many other items score at least as high as its own item."""
    owner = text_owner.long().to(similarity.device)
    ranks = []
    for start in range(0, similarity.shape[1], _CHUNK_ROWS):
        columns = similarity[:, start : start + _CHUNK_ROWS].T  # [m, N]
        mine = owner[start : start + columns.shape[0]]
        own_score = columns.gather(1, mine[:, None])
        others = torch.ones_like(columns, dtype=torch.bool).scatter_(1, mine[:, None], False)
        ranks.append(((columns >= own_score) & others).sum(dim=1))
    return torch.cat(ranks)


def recall_at_k(ranks: torch.Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[int, float]:
    """The share of queries whose rank is below each K."""
    _check_ks(ks)
    return {k: float((ranks < k).float().mean()) for k in ks}


def _check_ks(ks: Sequence[int]) -> None:
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise RetrievalInputError(f"ks must be positive integers, got {list(ks)}")


def chance_recall(
    text_owner: torch.Tensor, num_items: int, ks: Sequence[int] = DEFAULT_KS
) -> tuple[dict[int, float], dict[int, float]]:
    """Expected R@K of a random ranking: (item -> text, text -> item).

    An item owning ``c`` of ``M`` texts misses the top K with probability C(M-c, K) / C(M, K).
    """
    _check_ks(ks)
    num_texts = int(text_owner.shape[0])
    owned = torch.bincount(text_owner.long(), minlength=num_items).tolist()
    item_to_text = {}
    for k in ks:
        if k >= num_texts:
            item_to_text[k] = 1.0
            continue
        total = comb(num_texts, k)
        misses = [comb(num_texts - c, k) / total for c in owned]
        item_to_text[k] = 1.0 - sum(misses) / num_items
    text_to_item = {k: min(1.0, k / num_items) for k in ks}
    return item_to_text, text_to_item


def retrieval_metrics(
    item_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    text_owner: torch.Tensor | Sequence[int],
    ks: Sequence[int] = DEFAULT_KS,
) -> RetrievalResult:
    """Recall at ``ks`` both ways from embeddings (``[N,D]``, ``[M,D]``) and text owners ``[M]``."""
    owner = torch.as_tensor(text_owner)
    _check_inputs(item_embeddings, text_embeddings, owner)
    similarity = item_embeddings.float() @ text_embeddings.float().T
    return retrieval_from_similarity(similarity, owner, ks)


def retrieval_from_similarity(
    similarity: torch.Tensor,
    text_owner: torch.Tensor | Sequence[int],
    ks: Sequence[int] = DEFAULT_KS,
) -> RetrievalResult:
    """Recall at ``ks`` both ways from a ``[N items, M texts]`` similarity matrix."""
    owner = torch.as_tensor(text_owner)
    if similarity.ndim != 2:
        raise RetrievalInputError(f"similarity must be [N,M], got {tuple(similarity.shape)}")
    num_items, num_texts = similarity.shape
    check_owners(owner, num_items, num_texts)
    chance_i2t, chance_t2i = chance_recall(owner, num_items, ks)
    return RetrievalResult(
        num_items=num_items,
        num_texts=num_texts,
        item_to_text=recall_at_k(item_to_text_ranks(similarity, owner), ks),
        text_to_item=recall_at_k(text_to_item_ranks(similarity, owner), ks),
        chance_item_to_text=chance_i2t,
        chance_text_to_item=chance_t2i,
    )
