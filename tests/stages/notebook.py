"""A notebook's session: the whole pipeline twice through the library alone (no Prefect).

Run as ``python notebook.py SPEC.json`` (a fresh process, so that nothing imported Prefect
before): prints a JSON summary of both runs and the library's skip messages.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any


def main(spec: dict[str, Any]) -> dict[str, Any]:
    import amalgam.stages.evaluate as evaluate
    from amalgam.pipeline import run_pipeline
    from amalgam.recipe import parse_recipe

    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    library = logging.getLogger("amalgam")
    library.setLevel(logging.INFO)
    library.addHandler(Collect())

    recipe = parse_recipe(spec["recipe"])
    first = run_pipeline(recipe)
    first_messages, messages[:] = list(messages), []

    def no_scoring(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a model was scored again: the score cache was not used")

    evaluate.score_model = no_scoring  # type: ignore[assignment]
    second = run_pipeline(recipe)
    return {
        "first": first.as_dict(),
        "second": second.as_dict(),
        "first_messages": first_messages,
        "second_messages": messages,
        "prefect_imported": "prefect" in sys.modules,
        "recipe_hash": recipe.hash(),
    }


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        result = main(json.load(fh))
    print(json.dumps(result))
