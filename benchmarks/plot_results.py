"""The plots of the documentation's performance page, drawn from the committed benchmark
results (``benchmarks/results/*.json``) into ``docs/images/``:

    python -m benchmarks.plot_results

Needs matplotlib (the ``demo`` or ``test`` extra). Rerun it after committing new results."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"
IMAGES = Path(__file__).parent.parent / "docs" / "images"
CPU_RUN = "cpu-2core-amd-epyc"
REAL_MODELS_RUN = "cpu-2core-intel-xeon"
REAL_SHAPES_RUN = "real-shapes-cpu-2core-intel-xeon"


def load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def by_group(results: dict) -> dict[str, list[dict]]:
    groups = defaultdict(list)
    for bench in results["benchmarks"]:
        groups[bench["group"]].append(bench)
    return groups


def variant(bench: dict) -> str:
    """The parameter inside the benchmark's brackets: ``test_op[forward-cpu-x]`` -> ``forward-cpu-x``."""
    match = re.search(r"\[(.*)\]", bench["name"])
    return match.group(1) if match else bench["name"]


def ops_against_reference(results: dict, path: Path) -> None:
    """Per op benchmark: each backend's median, the reference (and torch for matrix_exp) beside the cpu kernel."""
    rows = []  # (label, {implementation: ms})
    for group, benches in sorted(by_group(results).items()):
        if not benches[0]["name"].startswith(("test_op[", "test_matrix_exp[", "test_tucker_merge[")):
            continue
        times = {}
        for bench in benches:
            implementation = next(name for name in ("cpu", "reference", "torch") if f"-{name}-" in variant(bench))
            times[implementation] = bench["stats"]["median"] * 1e3
        rows.append((group.removesuffix(" (cpu)"), times))
    implementations = ("cpu", "reference", "torch")
    colors = {"cpu": "tab:blue", "reference": "tab:gray", "torch": "tab:orange"}
    height = 0.8 / len(implementations)
    figure, axes = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.2))
    for position, (label, times) in enumerate(rows):
        for offset, implementation in enumerate(implementations):
            if implementation in times:
                axes.barh(position + offset * height, times[implementation], height, color=colors[implementation],
                          label=implementation)  # fmt: skip
    handles, labels = axes.get_legend_handles_labels()
    one_each = dict(zip(labels, handles))
    axes.legend(one_each.values(), one_each.keys(), loc="lower right")
    axes.set_yticks([p + height for p in range(len(rows))], [label for label, _ in rows], fontsize=8)
    axes.invert_yaxis()
    axes.set(xscale="log", xlabel="median ms (log scale)",
             title="Ops on CPU: cpu kernels, reference backend, torch")  # fmt: skip
    save(figure, path)


def layer_training_steps(results: dict, path: Path) -> None:
    """The adapter-layer training steps (conv2d and linear): each method's median and the floor."""
    groups = {g: b for g, b in by_group(results).items() if g.startswith("adapter layer training step")}
    figure, panels = plt.subplots(1, len(groups), figsize=(6 * len(groups), 5))
    for axes, (group, benches) in zip(panels, sorted(groups.items())):
        benches = sorted(benches, key=lambda b: b["stats"]["median"])
        names = [variant(b).split("-", 1)[1] for b in benches]
        times = [b["stats"]["median"] * 1e3 for b in benches]
        colors = ["tab:gray" if "peft" in n else "black" if n == "base" else "tab:blue" for n in names]
        axes.barh(names, times, color=colors)
        floor = benches[0]["extra_info"].get("floor_s")
        if floor:
            axes.axvline(floor * 1e3, color="tab:red", linestyle=":", label="floor (matmul rate)")
            axes.legend(loc="lower right")
        axes.invert_yaxis()
        axes.set(xlabel="median ms (forward + backward + step)", title=group.removesuffix(" (cpu)"))
        axes.tick_params(axis="y", labelsize=8)
    figure.suptitle("Adapter layers, one training step on CPU (blue: tensor_peft, gray: peft)")
    save(figure, path)


def real_models(results: dict, path: Path) -> None:
    """Step time and peak memory per method on each tiny real model, tensor_peft beside peft."""
    models = results["models"]
    figure, panels = plt.subplots(2, len(models), figsize=(6 * len(models), 8))
    for column, (model, methods) in enumerate(models.items()):
        names = list(methods)
        colors = ["tab:gray" if n.startswith("peft") else "tab:blue" for n in names]
        for row, (key, label) in enumerate((("step_ms", "step ms"), ("peak_mib", "peak MiB"))):
            axes = panels[row][column]
            axes.bar(names, [methods[n][key] for n in names], color=colors)
            axes.set(ylabel=label, title=f"{model}: {label}")
            axes.tick_params(axis="x", labelrotation=45, labelsize=8)
    figure.suptitle(f"Tiny real models, rank 8, {results['threads']} thread (blue: tensor_peft, gray: peft)")
    save(figure, path)


def flora_autotune(results: dict, path: Path) -> None:
    """FLoRA's two execution paths and what ``auto`` picked, per layer."""
    benches = results["benchmarks"]
    layers = [b["extra_info"]["layer"] for b in benches]
    paths = (("merged_ms", "merged", "tab:gray"), ("factorized_ms", "factorized", "tab:orange"),
             ("auto_ms", "auto", "tab:blue"))  # fmt: skip
    width = 0.8 / len(paths)
    figure, axes = plt.subplots(figsize=(10, 4.5))
    for offset, (key, label, color) in enumerate(paths):
        axes.bar([i + offset * width for i in range(len(layers))], [b["extra_info"][key] for b in benches], width,
                 label=label, color=color)  # fmt: skip
    axes.set_xticks([i + width for i in range(len(layers))], layers, rotation=20, ha="right", fontsize=8)
    axes.set(yscale="log", ylabel="ms per training step (log scale)",
             title="FLoRA: merged and factorized paths, and the one auto chose")  # fmt: skip
    axes.legend()
    save(figure, path)


def real_shapes(results: dict, path: Path) -> None:
    """Per real shape, each method's step time as × peft LoRA and × its floor, both timed
    beside it (``benchmarks/test_real_shapes.py``)."""
    groups = {g: b for g, b in by_group(results).items() if g.startswith("real shapes")}
    figure, panels = plt.subplots(2, 1, figsize=(12, 8), sharex=True)
    shapes = sorted(groups)
    methods = list(dict.fromkeys(b["extra_info"]["method"] for g in shapes for b in groups[g]))
    width = 0.8 / len(methods)
    for axes, (key, label) in zip(panels, (("baseline_s", "× peft LoRA"), ("floor_s", "× floor"))):
        for offset, method in enumerate(methods):
            xs, ys = [], []
            for position, group in enumerate(shapes):
                bench = next((b for b in groups[group] if b["extra_info"]["method"] == method), None)
                if bench is not None:
                    xs.append(position + offset * width)
                    ys.append(bench["stats"]["median"] / bench["extra_info"][key])
            axes.bar(xs, ys, width, label=method, color=plt.cm.tab10(offset % 10),
                     hatch="//" if method.startswith("peft") else None)  # fmt: skip
        axes.axhline(1.0, color="black", linewidth=0.8)
        axes.set(ylabel=label)
    panels[0].legend(ncol=5, fontsize=8, loc="upper left")
    panels[1].set_xticks([p + 0.4 - width / 2 for p in range(len(shapes))],
                         [g.removeprefix("real shapes: ").removesuffix(" (cpu)") for g in shapes],
                         rotation=15, ha="right", fontsize=8)  # fmt: skip
    figure.suptitle("One adapted layer's training step at real shapes, CPU (hatched: peft)")
    save(figure, path)


def save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    print(f"wrote {path}")


def main() -> None:
    IMAGES.mkdir(parents=True, exist_ok=True)
    cpu = load(CPU_RUN)
    ops_against_reference(cpu, IMAGES / "ops-cpu.png")
    layer_training_steps(cpu, IMAGES / "layers-cpu.png")
    real_models(load(f"real-models-{REAL_MODELS_RUN}"), IMAGES / "real-models-cpu.png")
    flora_autotune(load("flora-autotune"), IMAGES / "flora-autotune.png")
    real_shapes(load(REAL_SHAPES_RUN), IMAGES / "real-shapes-cpu.png")


if __name__ == "__main__":
    main()
