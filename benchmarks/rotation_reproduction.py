"""Histology reproduction of Gerken & Kessel (2024), Table 1: orbit-same-predictions (of |G|) for
C4, C8 and C16 — deep ensembles + augmentation, augmentation alone (one member) and the averaged
kernels — on held-out PathMNIST tiles and OOD inputs (Kather-2016 tiles, noise), mean ± std over
independent ensembles. One `eqk compare` run per group (same split, same sizes).

    python benchmarks/rotation_reproduction.py --out benchmarks/results/rotation_reproduction.json

C4 is exact on the grid (full-orbit augmentation, unmasked tiles); C8 and C16 act by bicubic
interpolation on disk-masked tiles (a fresh rotation per step). Writes the JSON (machine, CPU
flags, versions, sizes, figures, seconds) and prints the Markdown table for benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import machine, versions  # noqa: E402  (the benchmark harness's machine description)


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next(line for line in f if line.startswith("flags"))
        return sorted(set(line.split(":", 1)[1].split()) & {"avx", "avx2", "avx512f", "fma", "sse4_2"})
    except (OSError, StopIteration):
        return []


def run_group(group: str, args) -> dict:
    from eqkernels.pipelines import histology_compare as hc

    config = hc.CompareConfig(group=group, n_train=args.n_train, n_test=args.n_test, n_ood=args.n_ood,
                              steps=args.steps, members=args.members, seeds=args.seeds, gcnn_members=2,
                              curve_sizes=(1, args.members), widths=(16,), width_members=2, width_n_train=20,
                              sweep=False)
    t0 = time.perf_counter()
    summary = hc.run(config, progress=False, log=lambda m: print(f"[{group}] {m}", flush=True))
    summary.pop("ensembles", None)
    rows, curves, sets = summary["rows"], summary["curves"], list(summary["sets"])
    averaged = hc.GROUP_KERNELS[group][1]
    out = {"order": summary["group_order"], "seconds": time.perf_counter() - t0, "sets": summary["sets"],
           "kernel": averaged, "figures": {}}
    for label, values in (("deep ensembles + augmentation", rows["ensemble cnn-aug"]["values"]),
                          ("deep ensembles, no augmentation", rows["ensemble cnn"]["values"])):
        out["figures"][label] = {s: values[f"orbit_same_{s}"] for s in sets} | {"accuracy": values["accuracy"]}
    single = curves["cnn-aug"]
    out["figures"]["augmentation alone (1 member)"] = {
        s: [single[f"orbit_same_{s}"]["mean"][0], single[f"orbit_same_{s}"]["std"][0]] for s in sets}
    kv = rows[f"kernel {averaged}"]["values"]
    out["figures"][f"averaged kernel {averaged}"] = {s: kv[f"orbit_same_{s}"] for s in sets} | {
        "accuracy": kv["accuracy"], **{f"invariance_error_{s}": kv[f"invariance_error_{s}"] for s in sets}}
    out["timings"] = summary["timings"]
    return out


def table(results: dict) -> str:
    sets = list(next(iter(results.values()))["sets"])
    titles = {"test": "test", "kather2016": "OOD Kather-2016", "noise": "OOD noise"}
    head = ["model"] + [f"{g} {titles.get(s, s)}" for s in sets for g in results]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in next(iter(results.values()))["figures"]:
        key = label if not label.startswith("averaged kernel") else None
        cells = []
        for s in sets:
            for g, r in results.items():
                fig = r["figures"][key] if key else next(v for k, v in r["figures"].items() if k.startswith("averaged"))
                v = fig[s]
                cells.append(f"{v[0]:.2f} ± {v[1]:.2f}" if isinstance(v, list) else f"{v:.2f}")
        lines.append("| " + " | ".join([label if key else "averaged kernel (cnn-cNavg)"] + cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--groups", nargs="+", default=["C4", "C8", "C16"])
    parser.add_argument("--n-train", type=int, default=100)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--n-ood", type=int, default=50)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--members", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    results = {g: run_group(g, args) for g in args.groups}
    doc = {"benchmark": "rotation_reproduction", "command": " ".join(sys.argv), "machine": machine(),
           "cpu_flags": cpu_flags(), "versions": versions(), "sizes": vars(args) | {"out": str(args.out)},
           "groups": results, "markdown": table(results)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(doc["markdown"])


if __name__ == "__main__":
    main()
