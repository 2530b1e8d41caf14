"""The functions the jactus_*.yaml tasks name (`!function utils.<name>`); lm-eval imports this file by its path."""

from __future__ import annotations

import logging

import numpy as np
from lm_eval.api.instance import Instance
from lm_eval.api.task import ConfigurableTask

from jactus.lm_eval_tasks import task_docs

log = logging.getLogger("jactus")
ITEM_OPTIONS = ("split", "seed", "test_per_task", "root")


def load_dataset(task: str, tokenizer: str | None = None, pretrained: str | None = None,
                 trust_remote_code: bool = False, **metadata):
    """lm-eval's `custom_dataset`: called with the task's `dataset_kwargs` (task) and the run's metadata (the
    model arguments and `--metadata`). The tokenizer for the token counts and the continuation texts: `tokenizer`,
    else `pretrained` when it is a name or path (an instance passed in Python has none: use
    `jactus.lm_eval_tasks.evaluate`)."""
    import datasets

    source = tokenizer if isinstance(tokenizer, str) else pretrained if isinstance(pretrained, str) else None
    if source is None:
        log.warning("%s: no tokenizer name or path in the model arguments or --metadata: acc_per_token (jactus's "
                    "per-token normalisation) is left out, and the choices go to lm-eval as their own text (with a "
                    "SentencePiece tokenizer lm-eval then scores `yes` where jactus scores `▁yes`)", task)
    options = {key: metadata[key] for key in ITEM_OPTIONS if metadata.get(key) is not None}
    docs = task_docs(task, tokenizer=source, trust_remote_code=trust_remote_code, **options)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


class JactusQATask(ConfigurableTask):
    """lm-eval's multiple-choice task plus one request per item: the log-likelihood of the prompt's trailing
    whitespace alone. lm-eval moves that whitespace (jactus's prompts end with a newline) into every continuation,
    so it is part of each choice's log-likelihood; `acc_per_token` subtracts it to score the choice's own tokens."""

    def __init__(self, config: dict | None = None, **kwargs):
        # lm-eval hands a `class:` task its whole config, `class` included, which TaskConfig does not take
        super().__init__(config={key: value for key, value in (config or {}).items() if key != "class"}, **kwargs)

    def construct_requests(self, doc: dict, ctx: str, **kwargs) -> list[Instance]:
        requests = super().construct_requests(doc, ctx, **kwargs)
        if not ctx or not ctx[-1].isspace():
            return requests
        kwargs.pop("apply_chat_template", None)
        kwargs.pop("chat_template", None)
        return [*requests, Instance(request_type="loglikelihood", doc=doc, arguments=(ctx, ""), idx=len(requests),
                                    **kwargs)]


def process_results(doc: dict, results) -> dict:
    """acc and acc_norm as lm-eval computes them over the real choices; acc_per_token as jactus's scorer."""
    loglikelihoods = np.array([loglikelihood for loglikelihood, _ in results], dtype=np.float64)
    count = len(doc["choices"])
    choices = loglikelihoods[:count]
    delimiter = loglikelihoods[count] if len(loglikelihoods) > count else 0.0  # see JactusQATask
    gold = int(doc["gold"])
    characters = np.array([len(choice) for choice in doc["choices"]], dtype=np.float64)
    metrics = {"acc": float(np.argmax(choices) == gold), "acc_norm": float(np.argmax(choices / characters) == gold)}
    if doc.get("choice_tokens"):
        tokens = np.array(doc["choice_tokens"], dtype=np.float64)
        metrics["acc_per_token"] = float(np.argmax((choices - delimiter) / tokens) == gold)
    return metrics
