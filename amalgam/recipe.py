"""Recipes: what to merge, how, and where to write it (pydantic, loaded from YAML)."""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)

from amalgam.config_file import load_yaml
from amalgam.errors import RecipeError
from amalgam.mergekit_compat import translate
from amalgam.methods.base import Method, get_method

ParamValue = bool | int | float | str | list[float]
DTYPES = ("float32", "float16", "bfloat16")


STAGE_SECTIONS = ("align", "compress", "evaluate", "register")
# methods whose merged update is a weighted sum of the inputs' updates: their adapter output
# can be built from the factors (concat, lora_lego)
FACTOR_METHODS = ("linear", "task_arithmetic")
REDACTED = "<redacted>"


def redact_options(options: Mapping[str, Any]) -> dict[str, str]:
    """Storage options as they may be shown or stored: the option names, never the values."""
    return {name: REDACTED for name in options}


PASSWORD_IN_URI = re.compile(r"(?<=://)([^/@:\s]*):[^/@\s]*@")
# a query parameter that carries a credential (presigned URLs, SAS tokens, API keys)
SECRET_IN_QUERY = re.compile(
    r"([?&][^=&#\s]*(?:secret|password|passwd|token|signature|sig|credential|key)[^=&#\s]*=)"
    r"[^&#\s]*",
    re.IGNORECASE,
)


def redact_uri(uri: str | None) -> str | None:
    """A URI (or a text holding URIs) as it may be shown or stored: a password
    (``scheme://user:pw@host``) and credential query parameters (``?X-Amz-Signature=``,
    ``&token=``) hidden. The one redaction for URIs: records, reports, logs, errors."""
    if uri is None:
        return None
    return SECRET_IN_QUERY.sub(rf"\1{REDACTED}", PASSWORD_IN_URI.sub(rf"\1:{REDACTED}@", uri))


def redact_uris(value: Any) -> Any:
    """``value`` with :func:`redact_uri` applied to every text in it (mappings and lists
    walked): a record, report or table as it may be stored."""
    if isinstance(value, str):
        return redact_uri(value)
    if isinstance(value, Mapping):
        return {k: redact_uris(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_uris(v) for v in value]
    return value


# Storage options (credentials) as a field: kept in memory and in a pickle (Ray workers, the
# stages read them), redacted in every JSON form (``model_dump(mode="json")``,
# ``model_dump_json``: Prefect's flow parameters, reports, logs) and left out of ``repr``.
StorageOptions = Annotated[dict[str, Any], PlainSerializer(redact_options, when_used="json")]


def _regex(v: str) -> str:
    try:
        re.compile(v)
    except re.error as exc:
        raise ValueError(f"invalid regex {v!r}: {exc}") from exc
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """One input model: where it is, a short name, and its own parameter values.

    ``uri`` may name a PEFT LoRA adapter folder, merged over the recipe's base, or be
    ``BASE+ADAPTER`` (mergekit's syntax) to give the adapter's base (docs/adapters.md).

    Data-driven methods read the model's statistics: ``statistics`` names a precomputed
    artifact, else they are computed (once, then cached) by running the model on ``data``, a
    task folder (its validation split) or a jsonl of text records.
    """

    uri: str
    name: str | None = None
    params: dict[str, ParamValue] = Field(default_factory=dict)
    data: str | None = None
    statistics: str | None = None

    @property
    def label(self) -> str:
        return self.name or PurePosixPath(self.uri.rstrip("/")).name


class Override(_Strict):
    """Parameter values for tensors whose name matches ``match`` (a regex, re.search)."""

    match: str
    params: dict[str, ParamValue] = Field(default_factory=dict)
    models: dict[str, dict[str, ParamValue]] = Field(default_factory=dict)

    @field_validator("match")
    @classmethod
    def _compiles(cls, v: str) -> str:
        return _regex(v)


class TokenRowSpec(_Strict):
    """One token's embedding rows (``align.tokenizer.tokens``): ``source`` (``base``,
    ``model:<label>``: that input's row for the token; ``zero``) fills the inputs that lack the
    token, or every input with ``force``. A token no input has is added to the vocabulary."""

    source: str
    force: bool = False

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        return v if v == "zero" else _model_choice(v, "zero, ")


class TokenizerSpec(_Strict):
    """The vocabulary of the merged model (``align.method: vocab``; mergekit's
    ``tokenizer_source`` / ``tokenizer:`` section translate to it)."""

    source: str = "union"  # union | base | model:<label>
    # whose bos/eos/unk/pad tokens the output names (base: the base, else the first model)
    special_tokens: str = "base"  # base | model:<label>
    # base | model:<label> | a Jinja template; None: the special_tokens source's template
    chat_template: str | None = None
    # a row for a token a model lacks: auto (the base's row, else the mean of the rows of the
    # models that have the token, else zeros), mean (the mean of the model's own rows), zero
    init: Literal["auto", "mean", "zero"] = "auto"
    # base / model:<label>: a token another input holds under a different id is an error
    # unless remapping it to the output's id is allowed
    allow_remap: bool = False
    tokens: dict[str, TokenRowSpec] = Field(default_factory=dict)
    # rows rounded up to a multiple (padding rows: each model's mean row; vocab_size with them)
    pad_to_multiple_of: int | None = Field(default=None, gt=0)

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        return v if v == "union" else _model_choice(v, "union, ")

    @field_validator("special_tokens")
    @classmethod
    def _special(cls, v: str) -> str:
        return _model_choice(v, "")


def _model_choice(v: str, also: str) -> str:
    if v == "base" or (v.startswith("model:") and len(v) > len("model:")):
        return v
    raise ValueError(f"{v!r}: expected {also}base or model:<label>")


class PermutationSpec(_Strict):
    """Permutation alignment (``align.method: weight_matching | activation_matching | pleas``):
    every input's hidden units are permuted onto ``reference``'s (docs/align-permutation.md)."""

    data: str | None = None  # task folder or text the activation-driven methods run on
    reference: str | None = None  # input label; default: the first input (the base if any)
    residual: bool = False  # also permute the residual stream (one permutation, whole model)
    seed: int = 0  # order of the coordinate descent over groups
    max_iter: int = Field(default=100, gt=0)  # coordinate-descent passes at most
    samples: int = Field(default=256, gt=0)  # activation data: examples (lines) used
    max_length: int = Field(default=64, gt=0)  # activation data: tokens per example


class PleasSpec(_Strict):
    """PLeaS's layer fits (``align.method: pleas``, amalgam/align/permutation/pleas.py):
    ``budget``, the share of MLP units per layer kept unmerged (the merged MLP grows from ``I``
    to ``I + round(budget * I)`` units); ``ridge``, relative to the mean feature energy. The
    data is ``permutation.data`` (``samples`` records per task, ``max_length`` tokens each)."""

    budget: float = Field(default=0.0, ge=0.0, lt=1.0)
    ridge: float = Field(default=1e-4, ge=0.0)


class TransplantSpec(_Strict):
    """The tokenizer transplant (``align.method: transplant``, amalgam/align/transplant/): every
    input but ``donor`` (a label; default the first input) gets the donor's tokenizer, rows of
    the tokens it lacks approximated by ``method`` (``omp`` over ``k`` shared-token anchors,
    ``least_squares`` or ``subword``)."""

    donor: str | None = None
    method: Literal["omp", "least_squares", "subword"] = "omp"
    k: int = Field(default=8, ge=1)


class AlignSpec(_Strict):
    """The align stage. ``check``: refuse inputs whose tensor names, shapes or vocabularies
    differ. ``vocab``: remap every input's embedding rows into one vocabulary (``tokenizer``).
    ``transplant``: give every input one model's tokenizer, approximating the rows of the tokens
    it lacks (``transplant``). ``weight_matching`` / ``activation_matching`` / ``pleas``:
    permute the hidden units of each model onto the reference's (``permutation``)."""

    method: Literal[
        "check", "vocab", "transplant", "weight_matching", "activation_matching", "pleas"
    ] = "check"
    vocabulary: bool = True
    tokenizer: TokenizerSpec | None = None
    transplant: TransplantSpec | None = None
    permutation: PermutationSpec | None = None
    pleas: PleasSpec | None = None


#: The align section's sections of its own, hashed only when present.
ALIGN_SUBSECTIONS = ("tokenizer", "transplant", "permutation", "pleas")


Lambda = Annotated[float, Field(ge=0.0)]


class CompressSpec(_Strict):
    """The compress stage. ``compeft`` (arXiv 2311.13171): keep the top ``density`` fraction of
    each tensor's task vector by magnitude, as sign x one scale per tensor (``density``,
    ``scale``, ``alpha``, ``keep_dense``). ``tall`` (arXiv 2405.07813): the recipe's experts
    stored as one multi-task vector plus one bit mask per task, with the mask threshold
    ``tall_lambda`` (one value, or one per task name). ``mc_smoe`` (arXiv 2310.01334): an MoE's
    experts merged into ``experts`` per layer, grouped by the routing statistics of
    ``calibration`` (a jsonl file or a task folder's validation split, its first
    ``calibration_samples`` records); ``expert_merge``/``align`` pick the paper's
    frequency-weighted merge of permutation-aligned experts or the baselines (``drop``: keep
    the most used experts only; ``uniform`` without ``align``: plain averages); a group's
    router row is its dominant expert's (``router_fold: dominant``) or the members' rows
    averaged with the merge's weights (``average``). ``losparse_rank`` (default off) adds the
    paper's compress step: each merged expert weight stored as its rank-``losparse_rank`` SVD
    plus the ``losparse_density`` share of the residual's largest entries (a compressed folder
    that ``amalgam decompress`` turns back into a dense MoE)."""

    method: Literal["compeft", "tall", "mc_smoe"] = "compeft"
    density: float = Field(default=0.1, gt=0.0, le=1.0)
    scale: Literal["std", "mean"] = "mean"
    alpha: float = Field(default=1.0, gt=0.0)
    keep_dense: str | None = None
    tall_lambda: Lambda | dict[str, Lambda] = 0.4
    output: str | None = None
    max_shard_size: int = Field(default=5 * 10**9, gt=0)
    experts: int | None = Field(default=None, gt=0)
    calibration: str | None = None
    calibration_samples: int = Field(default=256, gt=0)
    expert_merge: Literal["frequency", "uniform", "drop"] = "frequency"
    align: bool = True
    router_fold: Literal["dominant", "average"] = "dominant"
    losparse_rank: int | None = Field(default=None, gt=0)
    losparse_density: float = Field(default=0.0, ge=0.0, le=1.0)

    @field_validator("keep_dense")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        return v if v is None else _regex(v)

    @model_validator(mode="after")
    def _losparse_with_mc_smoe(self) -> CompressSpec:
        if self.losparse_rank is not None and self.method != "mc_smoe":
            raise ValueError(f"losparse_rank compresses mc_smoe's experts, not {self.method}")
        if self.losparse_density > 0 and self.losparse_rank is None:
            raise ValueError("losparse_density needs losparse_rank")
        return self

    def settings(self) -> dict[str, Any]:
        """What decides the compressed bytes of this method (not where they go or how they are
        sharded)."""
        return {"method": self.method} | self.model_dump(
            mode="json", include=set(COMPRESS_SETTINGS[self.method])
        )


#: Per compress method, the spec fields that decide its output's bytes.
COMPRESS_SETTINGS: dict[str, tuple[str, ...]] = {
    "compeft": ("density", "scale", "alpha", "keep_dense"),
    "tall": ("tall_lambda",),
    "mc_smoe": (
        "experts",
        "calibration",
        "calibration_samples",
        "expert_merge",
        "align",
        "router_fold",
        "losparse_rank",
        "losparse_density",
    ),
}


class AdapterOutputSpec(_Strict):
    """How a merge becomes one PEFT adapter over the base (``output_format: adapter``).

    ``concat``: the inputs' factors side by side (rank = sum of ranks; exact, for linear and
    task arithmetic over adapters). ``lora_lego``: their rank-1 units clustered into ``rank``
    units (arXiv 2409.16167; default rank: the largest input rank). ``svd``: any method's
    merged update truncated to ``rank`` (default 16) or to the ``energy`` share per module.
    """

    method: Literal["concat", "lora_lego", "svd"] = "concat"
    rank: int | None = Field(default=None, gt=0)
    energy: float | None = Field(default=None, gt=0.0, le=1.0)


class EvaluateSpec(_Strict):
    """The evaluate stage: which tasks, how the model is run, experts per task, champion.

    ``tasks`` names the project's task folders under ``tasks_dir`` (all of them when
    ``tasks`` is unset), the user's lm-eval task YAMLs in the ``include_path`` folders, and
    lm-eval's own tasks and groups (groups are scored as their leaf tasks); their data must be
    local (see docs/lm-eval-tasks.md). ``task_overrides`` replaces fields of a task's YAML by task
    name, e.g. ``dataset_path: json`` and ``dataset_kwargs`` to point it at a local copy.
    ``dtype``: ``auto`` is bfloat16 on a CUDA device (float16 where the GPU has no bfloat16)
    and float32 on the CPU. ``max_gen_toks`` caps the tokens generated per answer of
    ``generate_until`` tasks (default: each task's own setting).
    """

    tasks_dir: str | None = None
    tasks: list[str] | None = None
    include_path: list[str] = Field(default_factory=list)
    task_overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    limit: int | None = Field(default=None, gt=0)
    batch_size: Annotated[int, Field(gt=0)] | Literal["auto"] = 32
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "float32"
    max_gen_toks: int | None = Field(default=None, gt=0)
    split: Literal["test", "validation"] = "test"
    engine: Literal["lm_eval", "quick"] = "lm_eval"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    experts: dict[str, str] | None = None
    champion: str | None = None
    perplexity: bool = True

    @model_validator(mode="after")
    def _names_its_tasks(self) -> EvaluateSpec:
        if self.tasks_dir is None and not self.tasks:
            raise ValueError("tasks: name the tasks to run (or set tasks_dir)")
        if self.engine == "quick" and self.tasks_dir is None:
            raise ValueError("engine: quick scores the task folders of tasks_dir; set it")
        return self


class Gates(_Strict):
    """Promotion gates: every task at or above its floor, few negative flips, no collapse, and
    (nightly) little forgetting along the champion chain: ``max_forgetting`` bounds each task's
    forgetting (one bound for every task, or a bound per named task), ``min_bwt`` the backward
    transfer (see :mod:`amalgam.evaluate.forgetting`; scores are fractions, 0.05 = 5 points)."""

    task_floor: float | dict[str, float] | None = None
    floor_metric: Literal["normalized_accuracy", "accuracy"] = "normalized_accuracy"
    max_negative_flip_rate: float | None = Field(default=None, ge=0.0, le=1.0)
    max_perplexity_ratio: float | None = Field(default=None, gt=0.0)
    max_forgetting: float | dict[str, float] | None = None
    min_bwt: float | None = None


class RegisterSpec(_Strict):
    """The register stage: MLflow tracking store, experiment, model name and promotion gates.
    A password in ``tracking_uri`` is redacted in its JSON forms (like storage options)."""

    tracking_uri: Annotated[str | None, PlainSerializer(redact_uri, when_used="json")] = Field(
        default=None, repr=False
    )
    experiment: str = "amalgam"
    model_name: str
    gates: Gates = Field(default_factory=Gates)

    @field_validator("tracking_uri")
    @classmethod
    def _not_redacted(cls, v: str | None) -> str | None:
        if v is not None and REDACTED in v:
            raise ValueError(f"{REDACTED} is a stored copy's placeholder (use the recipe file)")
        return v


class SliceSource(_Strict):
    """Layers ``[start, end)`` of one recipe input (a model's name, or ``base``)."""

    model: str
    layers: tuple[int, int]

    @field_validator("layers")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"expected [start, end) with 0 <= start < end, got {list(v)}")
        return v


class SliceSpec(_Strict):
    """One run of output layers: the method merges, layer by layer, the sources' ranges (all
    the same length), as mergekit's ``slices`` (docs/slices.md)."""

    sources: list[SliceSource] = Field(min_length=1)


class LayerSwapSpec(_Strict):
    """Layer swapping (arXiv 2410.01335) with ``method: passthrough`` over two models: the
    ``bottom`` first and ``top`` last layers from ``model``, the layers between from the
    other model (docs/slices.md)."""

    model: str
    bottom: int = Field(default=0, ge=0)
    top: int = Field(default=0, ge=0)


# pydantic warns that the field `register` shadows ABCMeta.register on the model class;
# instances read the field, and nothing registers virtual subclasses of Recipe.
warnings.filterwarnings("ignore", message='Field name "register" in "Recipe"', category=UserWarning)


class Recipe(_Strict):
    """A merge recipe. Later overrides win over earlier ones; per-model values win over shared."""

    method: str
    base: str | None = None
    models: list[ModelSpec] = Field(min_length=1)
    params: dict[str, ParamValue] = Field(default_factory=dict)
    overrides: list[Override] = Field(default_factory=list)
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    seed: int = 0
    output: str | None = None
    max_shard_size: int = Field(default=5 * 10**9, gt=0)
    files_from: str | None = None
    allow_nonfinite: bool = False
    # Tensors only some inputs hold (besides non-float buffers of the base): see
    # amalgam/align/tensor_sets.py, the rule the align check and the merge plan share.
    extra_tensors: Literal["error", "keep_from_first", "drop"] = "error"
    storage_options: StorageOptions = Field(default_factory=dict, repr=False)
    # Where the merge runs when the caller does not say (outputs are identical either way).
    executor: Literal["local", "ray"] | None = None
    # dense: a full model; adapter: a PEFT adapter over the base (see AdapterOutputSpec)
    output_format: Literal["dense", "adapter"] = "dense"
    adapter_output: AdapterOutputSpec | None = None
    # the output's layers taken from layer ranges of the inputs (amalgam/engine/stack.py)
    slices: list[SliceSpec] | None = Field(default=None, min_length=1)
    layer_swap: LayerSwapSpec | None = None
    align: AlignSpec | None = None
    compress: CompressSpec | None = None
    evaluate: EvaluateSpec | None = None
    register: RegisterSpec | None = None

    @field_validator("storage_options")
    @classmethod
    def _not_redacted(cls, v: dict[str, Any]) -> dict[str, Any]:
        redacted = sorted(k for k, value in v.items() if value == REDACTED)
        if redacted:
            raise ValueError(
                f"{', '.join(redacted)}: {REDACTED} is a stored copy's placeholder, not a value "
                "(run from the recipe file, or write the value as ${VAR})"
            )
        return v

    @property
    def method_spec(self) -> Method:
        return get_method(self.method)

    def hash(self) -> str:
        """sha256 of the recipe's canonical JSON, output location excluded (stage sections,
        the align section's own sections, ``adapter_output``, ``slices`` and ``layer_swap``
        count only when present, ``extra_tensors`` only when not ``error`` and
        ``output_format`` only when not ``dense``, so a recipe without them hashes as it
        always did)."""
        body = self.model_dump(mode="json", exclude={"output", "storage_options", "executor"})
        for section in (*STAGE_SECTIONS, "adapter_output", "slices", "layer_swap"):
            if body[section] is None:
                del body[section]
        for key in ALIGN_SUBSECTIONS:  # an align section without them hashes as it always did
            if body.get("align", {}).get(key, "") is None:
                del body["align"][key]
        for field, default in (("extra_tensors", "error"), ("output_format", "dense")):
            if body[field] == default:
                del body[field]
        if self.compress is not None:  # a ComPEFT section hashes as it did before mc_smoe
            body["compress"] = self.compress.model_dump(
                mode="json", include={"output", "max_shard_size", *self.compress.settings()}
            )
        return "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def validate_method(self) -> None:
        """Check the recipe against the method contract; one error lists every problem."""
        method = self.method_spec
        problems: list[str] = []
        n = len(self.models)
        if method.needs_base and self.base is None:
            problems.append(f"base: method '{method.name}' needs a base model")
        if n < method.min_models:
            problems.append(f"models: '{method.name}' needs at least {method.min_models} models")
        stacked = self.slices is not None or self.layer_swap is not None
        if method.max_models is not None and n > method.max_models and not stacked:
            problems.append(f"models: '{method.name}' takes at most {method.max_models} models")
        if method.name == "slerp" and (n == 2) == (self.base is not None):
            problems.append("models: slerp takes a base and one model, or two models and no base")
        labels = [m.label for m in self.models]
        if self.base is not None and "base" in labels:
            problems.append(
                "models: a model is named 'base', which names the base model; give it another name"
            )
        for dup in sorted({x for x in labels if labels.count(x) > 1}):
            problems.append(f"models: two models are named {dup!r}; give them distinct names")

        def check(values: dict[str, Any], where: str, per_model: bool) -> None:
            for key, value in values.items():
                param = method.param(key)
                if param is None:
                    known = ", ".join(p.name for p in method.params) or "none"
                    problems.append(
                        f"{where}.{key}: unknown parameter for '{method.name}' (known: {known})"
                    )
                elif per_model and not param.per_model:
                    problems.append(f"{where}.{key}: a shared parameter, not settable per model")
                else:
                    try:
                        param.check(value, f"{where}.{key}")
                    except RecipeError as exc:
                        problems.append(str(exc))

        if self.align is not None and self.align.method == "pleas":
            problems += pleas_problems(self)
        check(self.params, "params", False)
        for i, m in enumerate(self.models):
            check(m.params, f"models[{i}].params", True)
            if method.learns:
                if m.statistics:
                    problems.append(
                        f"models[{i}].statistics: method '{method.name}' learns on the models' "
                        "data: give data:, not statistics:"
                    )
                elif not m.data:
                    problems.append(
                        f"models[{i}].data: method '{method.name}' learns on each model's "
                        "unlabelled prompts: give data: (a task folder or jsonl)"
                    )
                continue
            if method.statistics is None and (m.data or m.statistics):
                field = "data" if m.data else "statistics"
                problems.append(f"models[{i}].{field}: method '{method.name}' reads no statistics")
            if method.statistics is not None and not (m.data or m.statistics):
                problems.append(
                    f"models[{i}]: method '{method.name}' needs statistics: give data: (a task "
                    "folder or jsonl) or statistics: (an artifact)"
                )
        for j, o in enumerate(self.overrides):
            check(o.params, f"overrides[{j}].params", False)
            for label, values in o.models.items():
                if label not in labels:
                    problems.append(f"overrides[{j}].models.{label}: no model named {label!r}")
                check(values, f"overrides[{j}].models.{label}", True)
        if method.check_recipe is not None:
            problems.extend(method.check_recipe(self))
        if self.files_from not in (None, "base", *labels):
            problems.append(f"files_from: {self.files_from!r} is neither 'base' nor a model name")
        problems.extend(self._adapter_output_problems())
        if stacked:
            problems.extend(stack_problems(self))
        if problems:
            raise RecipeError("invalid recipe:\n  " + "\n  ".join(problems))

    def _adapter_output_problems(self) -> list[str]:
        spec = self.adapter_output
        if self.output_format == "dense":
            return ["adapter_output: set output_format: adapter to use it"] if spec else []
        spec = spec or AdapterOutputSpec()
        problems = []
        if self.base is None:
            problems.append("output_format: an adapter output needs the recipe's base")
        if spec.method != "svd" and self.method not in FACTOR_METHODS:
            problems.append(
                f"adapter_output.method: {spec.method} merges adapter factors for "
                f"{' and '.join(FACTOR_METHODS)} only; use svd for '{self.method}'"
            )
        if spec.method == "concat" and (spec.rank or spec.energy):
            problems.append("adapter_output: concat keeps every rank (no rank or energy)")
        if spec.method == "lora_lego" and spec.energy:
            problems.append("adapter_output.energy: lora_lego takes a rank")
        if spec.rank and spec.energy:
            problems.append("adapter_output: give rank or energy, not both")
        return problems


def stack_problems(recipe: Recipe) -> list[str]:
    """``slices`` / ``layer_swap`` against the method and the inputs (the ranges against each
    model's layer count are checked when the models are opened)."""
    method = recipe.method_spec
    labels = ([] if recipe.base is None else ["base"]) + [m.label for m in recipe.models]
    problems = []
    if recipe.slices is not None and recipe.layer_swap is not None:
        problems.append("layer_swap: give slices or layer_swap, not both")
    if method.continual or method.statistics is not None:
        problems.append(f"slices: method '{method.name}' cannot merge stacked layers")
    if recipe.output_format != "dense":
        problems.append("slices: an adapter output cannot restack layers")
    one = method.single_input  # passthrough: one source per slice
    if one and recipe.files_from is not None:
        problems.append("files_from: a stacked model's config comes from its first slice")
    swap = recipe.layer_swap
    if swap is not None:
        if method.name != "passthrough" or len(recipe.models) != 2 or recipe.base is not None:
            problems.append("layer_swap: needs method passthrough over two models and no base")
        if swap.model not in labels:
            problems.append(f"layer_swap.model: no model named {swap.model!r}")
    for i, piece in enumerate(recipe.slices or []):
        where = f"slices[{i}]"
        names = [s.model for s in piece.sources]
        for j, name in enumerate(names):
            if name not in labels:
                problems.append(f"{where}.sources[{j}].model: no input named {name!r}")
        spans = {s.layers[1] - s.layers[0] for s in piece.sources}
        if len(spans) > 1:
            problems.append(
                f"{where}: its sources span different numbers of layers {sorted(spans)}"
            )
        if one and len(names) != 1:
            problems.append(f"{where}: method '{method.name}' takes one source per slice")
        elif not one and sorted(names) != sorted(labels):
            problems.append(
                f"{where}: method '{method.name}' merges every input, each once "
                f"({', '.join(labels)}); got {', '.join(names)}"
            )
    return problems


def pleas_problems(recipe: Recipe) -> list[str]:
    """``align.method: pleas`` hands on copies whose plain average is the PLeaS merge of two
    models, so the merge must be that average: ``method: linear`` over two models, no base,
    equal weights, ``normalize`` on."""
    if recipe.method != "linear":
        return [
            f"method: align.method pleas needs method: linear (the average), not {recipe.method}"
        ]
    problems = []
    if len(recipe.models) != 2 or recipe.base is not None:
        problems.append("models: align.method pleas merges exactly two models and no base")
    weights = {m.params.get("weight", recipe.params.get("weight", 1.0)) for m in recipe.models}
    if len(weights) > 1:
        problems.append(
            f"models[*].params.weight: align.method pleas needs equal weights,"
            f" not {sorted(weights)}"
        )
    if recipe.params.get("normalize", True) is not True:
        problems.append("params.normalize: align.method pleas needs the normalized average")
    return problems


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Build and validate a Recipe from a parsed YAML mapping (amalgam or mergekit)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: expected a mapping at the top level")
    if "merge_method" in data:
        data = translate(data, source)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "recipe"
            lines.append(f"{loc}: {err['msg']}")
        raise RecipeError(f"{source}: invalid recipe:\n  " + "\n  ".join(lines)) from None
    try:
        recipe.validate_method()
    except RecipeError as exc:
        raise RecipeError(f"{source}: {exc}") from None
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe YAML file (an amalgam recipe or a mergekit config, detected by its keys).

    ``${VAR}`` (or ``${VAR:-default}``) in a value is replaced from the environment; relative
    paths are relative to the working directory.
    """
    return parse_recipe(load_yaml(path, "recipe"), str(path))
