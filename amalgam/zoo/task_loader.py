"""lm-eval `custom_dataset` loader, copied into every zoo task folder as `loader.py`.

It reads the jsonl splits that lie beside it, so a task folder works wherever it is moved
(`dataset_kwargs.data_files` would pin absolute paths into the YAML).
"""

import json
from pathlib import Path

import datasets


def load(**_: object) -> datasets.DatasetDict:
    here = Path(__file__).parent
    splits = {}
    for split in ("validation", "test"):
        with (here / f"{split}.jsonl").open() as f:
            splits[split] = datasets.Dataset.from_list([json.loads(line) for line in f])
    return datasets.DatasetDict(splits)
