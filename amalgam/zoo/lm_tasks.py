"""Writes the zoo's tasks as lm-eval task folders (jsonl splits + one YAML per scored split)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from amalgam.evaluate.taskdir import lm_eval_task_name
from amalgam.zoo.tasks import Example

LOADER = Path(__file__).with_name("task_loader.py")
GROUP = "zoo"

# Zero-shot multiple choice scored by log-likelihood. `target_delimiter` is empty because the
# prompt ends with "=" and the answer follows with no space (lm-eval would put one between).
TASK_YAML = """\
task: {name}
custom_dataset: !function loader.load
output_type: multiple_choice
{split}_split: {split}
doc_to_text: prompt
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
num_fewshot: 0
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

# The zoo's one generative task: the answer to a `zoo_sort` prompt generated greedily. The
# models were never taught to stop, so a regex filter keeps the first 8 characters (the
# answer's length) and exact match scores them: `exact_match,answer` in lm-eval's results.
GENERATIVE_TASK, GENERATIVE_SOURCE = "zoo_sort_gen", "zoo_sort"
GENERATIVE_YAML = """\
task: {name}
custom_dataset: !function loader.load
output_type: generate_until
test_split: test
doc_to_text: prompt
doc_to_target: "{{{{choices[label]}}}}"
generation_kwargs:
  until: ["</s>"]
  max_gen_toks: 10
  do_sample: false
filter_list:
  - name: answer
    filter:
      - function: regex
        regex_pattern: "^(.{{8}})"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

GROUP_YAML = """\
group: {group}
task: {tasks}
aggregate_metric_list:
  - metric: acc
    aggregation: mean
    weight_by_size: false
metadata:
  version: 1.0
"""


def write_jsonl(path: Path, examples: list[Example]) -> None:
    with path.open("w") as f:
        for example in examples:
            f.write(json.dumps(example.to_json()) + "\n")


def write_tasks(tasks_dir: Path, splits: dict[str, dict[str, list[Example]]]) -> None:
    """One folder per task with its three jsonl splits, the loader, and a YAML for each of the
    test and validation splits; plus the groups `zoo` (test) and `zoo_val` (validation), and
    the generative task `zoo_sort_gen` (test split) in the `zoo_sort` folder."""
    tasks_dir.mkdir(parents=True, exist_ok=True)
    for task, task_splits in splits.items():
        folder = tasks_dir / task
        folder.mkdir()
        for split, examples in task_splits.items():
            write_jsonl(folder / f"{split}.jsonl", examples)
        shutil.copyfile(LOADER, folder / "loader.py")
        for split in ("test", "validation"):
            name = lm_eval_task_name(task, split)
            (folder / f"{name}.yaml").write_text(TASK_YAML.format(name=name, split=split))
        if task == GENERATIVE_SOURCE:
            text = GENERATIVE_YAML.format(name=GENERATIVE_TASK)
            (folder / f"{GENERATIVE_TASK}.yaml").write_text(text)
    for split in ("test", "validation"):
        group = lm_eval_task_name(GROUP, split)
        members = json.dumps([lm_eval_task_name(task, split) for task in splits])
        (tasks_dir / f"{group}.yaml").write_text(GROUP_YAML.format(group=group, tasks=members))
