"""promote: check a version's gates and move the ``champion`` alias, or refuse naming the gate."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from amalgam.errors import RecipeError
from amalgam.recipe import Gates


def gates_of(recipe: dict, name: str, version: str) -> Gates:
    """The gates recorded with the version's recipe (``register.gates``)."""
    register = recipe.get("register")
    if not register:
        raise RecipeError(f"{name} version {version}: its recipe has no register section")
    return Gates.model_validate(register.get("gates") or {})


@task(name="promote", cache_policy=NO_CACHE)
def promote_version(name: str, version: str, tracking_uri: str | None = None) -> dict:
    """Promote under the registry's lock; a refusal is recorded on the version's run (tags
    ``amalgam.promotion`` and ``amalgam.promotion.reason``) and as a Prefect artifact."""
    from amalgam.registry import PromotionRefused, Registry

    registry = Registry(tracking_uri)
    lineage = registry.lineage(name, version)
    try:
        result = registry.promote(name, lineage.version, gates_of(lineage.recipe, name, version))
    except PromotionRefused as refused:
        create_markdown_artifact(
            key="promotion",
            markdown=f"### {name} version {version} not promoted\n\n"
            + "\n".join(f"- {f}" for f in refused.failures),
        )
        raise
    create_markdown_artifact(
        key="promotion",
        markdown=f"### {name} version {result.version} is champion "
        f"(was {result.previous or 'none'})",
    )
    get_run_logger().info("%s: champion %s -> %s", name, result.previous or "none", result.version)
    return {"name": name, "version": result.version, "previous": result.previous}


@flow(name="promote")
def promote(name: str, version: str, tracking_uri: str | None = None) -> dict:
    """Check the gates of ``name`` ``version`` and make it champion, or raise
    :class:`amalgam.registry.PromotionRefused` naming every failing gate."""
    return promote_version(name, version, tracking_uri)
