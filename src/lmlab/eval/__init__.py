"""Evaluation: perplexity, tasks scored on log-likelihood or generated answers, majority vote.

from lmlab.eval import perplexity, evaluate, get_task
perplexity(lm, text).perplexity
evaluate(lm, get_task("facts"), shots=3).metrics
compare_runs([store.get(a), store.get(b)])   # intervals and a paired test of stored eval runs
"""

from lmlab.eval.compare import compare_runs
from lmlab.eval.loglik import Scored, encode_pair, score_texts, score_tokens
from lmlab.eval.perplexity import PerplexityResult, perplexity
from lmlab.eval.run import EvalResult, evaluate, majority, paired_test
from lmlab.eval.tasks import BUILTIN, Item, Task, get_task, load_jsonl

__all__ = [
    "compare_runs",
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
