"""Accuracy on the prepared data: the rating (chance is 20%) or, for plain text, the next token; and perplexity.

For the rating task only the answer is scored: the logits just before the rating token,
restricted to the five answers, so a model must pick a rating, not merely predict a digit.
"""

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


class Accuracy:
    def __init__(self, answer_token_ids: list[int]) -> None:
        self.answer_ids = torch.tensor(answer_token_ids, dtype=torch.long)

    def correct(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """1 where the prediction is right, 0 where wrong, -1 where nothing is scored."""
        if len(self.answer_ids) == 0:  # plain text: next-token accuracy over the label positions
            right = (logits[:, :-1].argmax(-1) == labels[:, 1:]).long()
            return right.masked_fill(labels[:, 1:] == -100, -1)
        answers = self.answer_ids.to(labels.device)
        is_answer = torch.isin(labels, answers)
        positions = torch.arange(labels.shape[1], device=labels.device)
        pos = (is_answer * positions).argmax(-1)  # the last answer token in each row
        rows = torch.arange(labels.shape[0], device=labels.device)
        choice = logits[rows, pos - 1][:, answers].argmax(-1)  # logits at t predict token t + 1
        right = (answers[choice] == labels[rows, pos]).long()
        return right.masked_fill(~is_answer.any(-1), -1).unsqueeze(-1)

    # The Trainer's two hooks: reduce logits per batch (so eval never holds all logits), then average.
    def preprocess_logits_for_metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: 1/0/-1 per scored position, and (loss summed over its target tokens, their number). The Trainer's
        eval_loss divides by every label, the first of each row included, which has no prediction (and weighs batches
        by examples, not tokens): perplexity is computed here, per target token, as the custom loops do."""
        losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")
        totals = torch.stack([losses.sum(-1), (labels[:, 1:] != -100).sum(-1).float()], dim=-1)
        return self.correct(logits, labels), totals

    def compute_metrics(self, eval_pred: Any) -> dict[str, float]:
        predictions = eval_pred.predictions
        correct, totals = predictions if isinstance(predictions, tuple) else (predictions, None)
        scored = np.asarray(correct)
        scored = scored[scored >= 0]  # the Trainer pads with -100 across batches
        metrics = {"accuracy": float(scored.mean()) if scored.size else 0.0}
        if totals is not None:  # exp of the mean loss per target token
            loss_sum, tokens = np.asarray(totals, dtype=np.float64).sum(0)
            metrics["perplexity"] = math.exp(min(loss_sum / max(tokens, 1.0), 700.0))
        return metrics
