"""Training-memory estimate of each method at any batch size, from the tensors autograd keeps for backward.

Runs one forward pass per batch size (2 and 4 images, on any device, CPU included) under
`torch.autograd.graph.saved_tensors_hooks` and sums the distinct storages it saves, parameters excluded. The
difference between the two gives the activations per image, the rest is batch-independent (autocast's bf16 weight
copies, the masks' index tables). Added: fp32 weights, gradients and AdamW's two moments of every trainable
parameter (16 bytes each), frozen parameters and buffers (the LUT teacher) at their size. With gradient
checkpointing the checkpointed encoder blocks save nothing; their inputs, which the checkpoints keep, are counted
instead.

This is an estimate of the peak a GPU would reach, not a measurement: it leaves out the caching allocator's reserve
and fragmentation, kernel workspaces and the transient tensors of the backward pass (one block's activations while
it is recomputed under gradient checkpointing), and CPU autocast may keep a few tensors in another dtype than CUDA's.
`python -m benchmarks.bench --device cuda` measures the real peak.

    python -m benchmarks.memory --methods mae --size large --batches 128,256 --precision bf16 [--grad-checkpointing]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from benchmarks.methods import available_methods, build_method, example_views, set_grad_checkpointing
from lightning_mim.methods import MIMMethod

PROBE_BATCHES = (2, 4)
GIB = 2**30


def saved_storage_bytes(run: Callable[[], Any], exclude: Iterable[torch.Tensor] = (),
                        keep_inputs_of: Iterable[torch.nn.Module] = ()) -> int:
    """Bytes of the distinct storages that autograd saves for backward while `run()` executes, those of `exclude`
    (the parameters) left out; the inputs of the `keep_inputs_of` modules (checkpointed blocks) are counted too."""
    excluded = {tensor.untyped_storage().data_ptr() for tensor in exclude}
    storages: dict[int, int] = {}

    def record(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def record_input(module: torch.nn.Module, inputs: tuple[Any, ...]) -> None:
        if torch.is_grad_enabled():
            record(inputs[0])

    hooks = [module.register_forward_pre_hook(record_input) for module in keep_inputs_of]
    try:
        with torch.autograd.graph.saved_tensors_hooks(record, lambda tensor: tensor):
            run()
    finally:
        for hook in hooks:
            hook.remove()
    return sum(storages.values())


def saved_bytes(method: MIMMethod, batch: int, device: torch.device, bf16: bool) -> int:
    """What one training forward pass of `method` on `batch` images saves for backward, parameters excluded."""
    views = example_views(method, batch, device)
    torch.manual_seed(0)

    def forward() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            method.weighted_total(method.compute_losses(views))

    checkpointed = method.backbone.blocks if method.backbone.grad_checkpointing else ()
    return saved_storage_bytes(forward, method.parameters(), checkpointed)


def static_bytes(method: MIMMethod) -> int:
    """fp32 weights + gradients + AdamW's two moments (16 bytes a trainable parameter), frozen parameters and
    buffers at their size."""
    trainable = sum(16 * p.numel() for p in method.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in method.parameters() if not p.requires_grad)
    return trainable + frozen + sum(b.numel() * b.element_size() for b in method.buffers())


def estimate(method: MIMMethod, batches: list[int], device: torch.device, bf16: bool) -> dict[str, Any]:
    method.to(device).train()
    small, large = (saved_bytes(method, batch, device, bf16) for batch in PROBE_BATCHES)
    per_image = (large - small) / (PROBE_BATCHES[1] - PROBE_BATCHES[0])
    fixed = small - per_image * PROBE_BATCHES[0]
    static = static_bytes(method)
    return {
        "params_m": sum(p.numel() for p in method.parameters() if p.requires_grad) / 1e6,
        "static_gib": static / GIB, "activations_mib_per_image": per_image / 2**20,
        "batch_independent_saved_gib": fixed / GIB,
        "estimated_gib": {batch: (static + fixed + per_image * batch) / GIB for batch in batches},
    }


def to_markdown(rows: dict[str, dict[str, Any]], batches: list[int], args: argparse.Namespace) -> str:
    lines = [f"# Training-memory estimate: ViT-{args.size}/{args.patch_size} at {args.img_size} px, "
             f"{'bf16 autocast' if args.precision == 'bf16' else 'fp32'}, gradient checkpointing "
             f"{'on' if args.grad_checkpointing else 'off'} (saved tensors, not a GPU measurement)", "",
             "| method | params (M) | weights + grads + AdamW (GiB) | activations (MiB / image) | "
             + " | ".join(f"estimate at batch {batch} (GiB)" for batch in batches) + " |",
             "|" + "---|" * (4 + len(batches))]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['params_m']:.1f} | {row['static_gib']:.2f} | "
                     f"{row['activations_mib_per_image']:.1f} | "
                     + " | ".join(f"{row['estimated_gib'][batch]:.1f}" for batch in batches) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="all", help="comma-separated method names, or 'all'")
    parser.add_argument("--size", default="large")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--batches", default="128,256", help="comma-separated batch sizes to estimate")
    parser.add_argument("--precision", choices=("32", "bf16"), default="bf16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--method-args", type=json.loads, default={})
    parser.add_argument("--out", default=None, help="folder for memory.md and memory.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    args = parse_args(argv)
    known = available_methods()
    names = list(known) if args.methods == "all" else [name.strip().lower() for name in args.methods.split(",")]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {sorted(known)} or 'all'")
    batches = [int(batch) for batch in args.batches.split(",")]
    rows = {}
    for name in names:
        method = build_method(known[name], args)
        set_grad_checkpointing(method, args.grad_checkpointing)
        rows[name] = estimate(method, batches, torch.device(args.device), args.precision == "bf16")
        del method
    text = to_markdown(rows, batches, args)
    print(text, end="")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "memory.md").write_text(text)
        (out / "memory.json").write_text(json.dumps({"settings": vars(args), "methods": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
