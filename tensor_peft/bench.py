"""``python -m tensor_peft bench``: run the benchmark suites of ``benchmarks/`` with
pytest-benchmark and write ``benchmarks/results/<name>.json`` (pytest-benchmark's JSON)
and ``<name>.md``: per group, each benchmark's median, its ratio to the group's baseline
(``extra_info["baseline"]``, or the baseline's median timed beside it, ``"baseline_s"``)
and to the physical floor (``extra_info["floor_s"]``), all from the same run."""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path


def default_name() -> str:
    import torch

    if torch.cuda.is_available():
        return re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-").lower()
    return re.sub(r"[^A-Za-z0-9]+", "-", f"cpu-{platform.node()}").strip("-").lower()


def _note(key: str, value) -> str:
    """A note: ``key=value``, seconds (a key ending in ``_s``) in ms."""
    return f"{key.removesuffix('_s')}={value * 1e3:.1f}ms" if key.endswith("_s") else f"{key}={value}"


def markdown(results: dict) -> str:
    """The results as one markdown table per benchmark group."""
    groups = defaultdict(list)
    for bench in results["benchmarks"]:
        groups[bench["group"]].append(bench)
    lines = [f"# Benchmarks ({results['machine_info'].get('node', '')}, {results['datetime']})", ""]
    floors = results.get("floors")
    if floors:
        lines += [f"Floors measured in this run: copy bandwidth {floors['copy_bytes_per_s'] / 1e9:.1f} GB/s "
                  f"(read + write), float32 matmul {floors['macs_per_s'] / 1e9:.1f} GMAC/s.", ""]  # fmt: skip
    for group, benches in sorted(groups.items()):
        baseline = next((b for b in benches if b["extra_info"].get("baseline")), None)
        lines += [f"## {group}", "", "| benchmark | median ms | vs baseline | floor ms | vs floor | notes |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for bench in sorted(benches, key=lambda b: b["stats"]["median"]):
            median = bench["stats"]["median"]
            extra = dict(bench["extra_info"])
            floor = extra.pop("floor_s", None)
            is_baseline = extra.pop("baseline", False)
            beside = extra.pop("baseline_s", None) or (baseline and baseline["stats"]["median"])
            ratio = f"{median / beside:.2f}x" if beside else "-"
            notes = ", ".join(_note(k, v) for k, v in extra.items()) + (" (baseline)" if is_baseline else "")
            floor_cells = f"{floor * 1e3:.3f} | {median / floor:.2f}x" if floor else "- | -"
            lines.append(f"| {bench['name']} | {median * 1e3:.3f} | {ratio} | {floor_cells} | {notes.strip(', ')} |")
        lines.append("")
    return "\n".join(lines)


def main(name: str | None, select: str | None, root: Path = Path("benchmarks"), out: Path | None = None) -> int:
    """Run the suites under ``root``; write ``<out>/<name>.{json,md}`` (out: root/results)."""
    if not root.is_dir():
        print(f"python -m tensor_peft bench needs a source checkout of tensor_peft: it runs the suites in "
              f"{root}/, which an installed package does not ship, and there is no {root.resolve()}. "
              f'Clone the repository, pip install -e ".[test]" and run it from the repository root.',
              file=sys.stderr)  # fmt: skip
        return 2
    name = name or default_name()
    out = out or root / "results"
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{name}.json"
    command = [sys.executable, "-m", "pytest", str(root), "--benchmark-only", f"--benchmark-json={json_path}",
               "-p", "no:cacheprovider", "-v"] + (["-k", select] if select else [])  # fmt: skip
    status = subprocess.run(command).returncode
    if not json_path.exists():
        return status or 1
    results = json.loads(json_path.read_text())
    (out / f"{name}.md").write_text(markdown(results))
    print(f"wrote {json_path} and {out / (name + '.md')}")
    return status
