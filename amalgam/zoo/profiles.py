"""Build profiles of the zoo: model sizes, data sizes and training schedules."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelShape(Frozen):
    """The shape of a decoder-only model (Llama; Mixtral when `experts` > 0, trained with
    Mixtral's load-balancing loss weighted by `router_aux_loss` when that is > 0)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    experts: int = 0
    experts_per_token: int = 2
    router_aux_loss: float = 0.0
    max_positions: int = 64


class Schedule(Frozen):
    """AdamW with linear warm-up then cosine decay to 10% of `lr`."""

    steps: int
    lr: float
    batch_size: int = 64
    warmup: int = 20
    weight_decay: float = 0.0


class Profile(Frozen):
    """Everything that decides the bytes of a zoo build (with the code and library versions)."""

    name: str
    seed: int = 1234
    train_examples: int
    validation_examples: int
    test_examples: int
    base: ModelShape
    base_schedule: Schedule
    expert_schedule: Schedule
    lora_rank: int
    lora_schedule: Schedule
    moe: ModelShape
    moe_schedule: Schedule


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            name="full",
            train_examples=4000,
            validation_examples=200,
            test_examples=300,
            base=ModelShape(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=352),
            # A long pretraining and short, gentle fine-tunes (task vectors about a tenth of
            # the base's norm): see docs/quality.md for what this does to merging.
            base_schedule=Schedule(steps=2000, lr=3e-3, warmup=50, weight_decay=0.01),
            expert_schedule=Schedule(steps=80, lr=5e-4, batch_size=48),
            lora_rank=8,
            lora_schedule=Schedule(steps=80, lr=2e-3, batch_size=48),
            # 8 experts from scratch with a load-balancing loss: they specialise (routing
            # differs by task, see report.md), a test subject for MC-SMoE (docs/zoo.md).
            moe=ModelShape(
                hidden=96,
                layers=2,
                heads=4,
                kv_heads=2,
                intermediate=192,
                experts=8,
                router_aux_loss=0.01,
            ),
            moe_schedule=Schedule(steps=600, lr=3e-3, warmup=30),
        ),
        Profile(
            name="tiny",
            train_examples=1000,
            validation_examples=64,
            test_examples=100,
            base=ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=160),
            base_schedule=Schedule(steps=300, lr=4e-3, warmup=20, weight_decay=0.01),
            expert_schedule=Schedule(steps=50, lr=2e-3, batch_size=32),
            lora_rank=4,
            lora_schedule=Schedule(steps=40, lr=5e-3, batch_size=32),
            moe=ModelShape(
                hidden=32,
                layers=1,
                heads=2,
                kv_heads=1,
                intermediate=64,
                experts=8,
                router_aux_loss=0.01,
            ),
            moe_schedule=Schedule(steps=60, lr=3e-3, batch_size=32, warmup=5),
        ),
    )
}
