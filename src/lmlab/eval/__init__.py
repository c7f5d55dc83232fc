"""Evaluation: perplexity, tasks scored on log-likelihood or generated answers, majority vote.

from lmlab.eval import perplexity, evaluate, get_task
perplexity(lm, text).perplexity
evaluate(lm, get_task("facts"), shots=3).metrics
"""

from lmlab.eval.loglik import Scored, encode_pair, score_texts, score_tokens
from lmlab.eval.perplexity import PerplexityResult, perplexity
from lmlab.eval.run import EvalResult, evaluate, majority, paired_test
from lmlab.eval.tasks import BUILTIN, Item, Task, get_task, load_jsonl

__all__ = [
    "Scored",
    "encode_pair",
    "score_texts",
    "score_tokens",
    "PerplexityResult",
    "perplexity",
    "EvalResult",
    "evaluate",
    "majority",
    "paired_test",
    "BUILTIN",
    "Item",
    "Task",
    "get_task",
    "load_jsonl",
]
