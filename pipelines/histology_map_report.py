"""Outputs of `eqk histology map`: class map and uncertainty map (PNG), area table (Markdown, JSON, CSV),
tiles as GeoJSON (QuPath opens it: File → Import objects), and summary.json.

A map that is not complete (interrupted) is written with every file marked: PARTIAL.txt in the
folder, "PARTIAL" in the PNG titles and the Markdown heading, `"complete": false` in the JSON files.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from eqkernels.pipelines.histology import NCT_CLASSES, NCT_DESCRIPTIONS
from eqkernels.pipelines.histology_map import PARTIAL_MARKER, SlideMap, TilePredictor

# Fixed colours (RGB 0-255) so a class keeps its colour across maps.
PALETTE = [(230, 159, 0), (120, 120, 120), (86, 180, 233), (0, 114, 178), (204, 121, 167), (213, 94, 0),
           (0, 158, 115), (240, 228, 66), (170, 0, 60), (100, 60, 160), (60, 160, 60), (0, 0, 0)]


def class_colour(i: int) -> tuple[int, int, int]:
    return PALETTE[i % len(PALETTE)]


def area_table(result: SlideMap) -> list[dict]:
    """Per class: predicted tiles, area in mm² (tiles × stride² × mpp²) and % of the mapped tissue tiles."""
    classes = result.classes[result.done]
    total = max(len(classes), 1)
    cell = result.grid.cell_area_mm2()
    rows = []
    for i, name in enumerate(result.class_names):
        n = int(np.sum(classes == i))
        rows.append({"class": name, "tiles": n, "area_mm2": n * cell, "percent_of_tissue": 100.0 * n / total})
    return rows


def rotation_summary(result: SlideMap) -> dict | None:
    """Fraction of tissue tiles whose class changes when the slide is rotated by 90° (None without the check)."""
    if result.rotated_classes is None:
        return None
    done = result.done
    changed = result.rotated_classes[done] != result.classes[done]
    return {"tiles": int(done.sum()), "tiles_changed": int(changed.sum()),
            "fraction_changed": float(changed.mean()) if done.any() else None,
            "grid": "anchored at the top-left corner; the covered region rotated by 90° maps the grid onto itself, "
                    "so each tile of the rotated slide is np.rot90 of a tile of this one"}


def summary(result: SlideMap, predictor: TilePredictor, slide, model_path) -> dict:
    g = result.grid
    return {"complete": result.complete, "tiles_done": int(result.done.sum()), "tissue_tiles": len(result.tiles),
            "slide": str(slide.path), "reader": slide.backend, "mpp": slide.mpp, "mpp_source": slide.mpp_source,
            "model": str(model_path), "model_label": predictor.label, "classes": result.class_names,
            "field_of_view_um": g.tile * g.mpp, "level": g.level, "level_mpp": g.mpp, "tile_px": g.tile,
            "stride_px": g.stride, "grid_rows": g.rows, "grid_cols": g.cols, "cell_area_mm2": g.cell_area_mm2(),
            "tissue_threshold_od": result.info.get("threshold_od"),
            "tissue_fraction_of_slide": result.info.get("tissue_fraction_of_slide"),
            "uncertainty": predictor.uncertainty_name, "tiles_predicted": result.info.get("tiles_predicted"),
            "tiles_resumed": result.info.get("tiles_resumed"), "seconds": result.info.get("seconds"),
            "tiles_per_s": result.info.get("tiles_per_s"), "areas": area_table(result),
            "rotation_check": rotation_summary(result)}


def write_outputs(result: SlideMap, predictor: TilePredictor, slide, model_path, out: Path) -> dict:
    """Write every output into `out` (atomically per file); returns the summary."""
    from eqkernels.store import atomic_file, write_json

    out.mkdir(parents=True, exist_ok=True)
    info = summary(result, predictor, slide, model_path)
    marker = out / PARTIAL_MARKER
    if not result.complete:  # first, so no moment shows unmarked partial files
        marker.write_text(f"PARTIAL map: {info['tiles_done']} of {info['tissue_tiles']} tissue tiles predicted. "
                          "Rerun the same command to finish it; finished tiles are kept in .checkpoint/.\n")
    texts = {"areas.md": areas_markdown(info), "areas.csv": areas_csv(info["areas"]),
             "tiles.geojson": json.dumps(geojson(result, predictor), indent=1) + "\n"}
    for name, text in texts.items():
        with atomic_file(out / name) as tmp:
            Path(tmp).write_text(text)
    write_json(out / "areas.json", {"complete": info["complete"], "cell_area_mm2": info["cell_area_mm2"],
                                    "areas": info["areas"]})
    plot_maps(result, predictor, out, title=_title(info, slide))
    write_json(out / "summary.json", info)
    if result.complete:
        marker.unlink(missing_ok=True)
    return info


def _title(info: dict, slide) -> str:
    head = f"{info['model_label']} on {slide.path.name}"
    if not info["complete"]:
        head = f"PARTIAL ({info['tiles_done']} of {info['tissue_tiles']} tiles) — " + head
    return head


def areas_markdown(info: dict) -> str:
    lines = [f"# {'PARTIAL ' if not info['complete'] else ''}Tissue map: {Path(info['slide']).name}", ""]
    if not info["complete"]:
        lines += [f"**PARTIAL**: {info['tiles_done']} of {info['tissue_tiles']} tissue tiles predicted; rerun to "
                  "finish.", ""]
    lines += [f"Model: {info['model_label']} (`{info['model']}`). Slide: {info['mpp']:g} µm/px ({info['mpp_source']}); "
              f"tiles of {info['field_of_view_um']:.1f} µm = {info['tile_px']} px at level {info['level']} "
              f"({info['level_mpp']:g} µm/px), stride {info['stride_px']} px; {info['tissue_tiles']} tissue tiles of "
              f"{info['grid_rows']}×{info['grid_cols']}. Area per tile: {info['cell_area_mm2']:.5f} mm².", "",
              "| class | tiles | area (mm²) | % of tissue |", "|---|---:|---:|---:|"]
    descriptions = dict(zip(NCT_CLASSES, NCT_DESCRIPTIONS))
    for row in info["areas"]:
        name = row["class"] + (f" ({descriptions[row['class']]})" if row["class"] in descriptions else "")
        lines.append(f"| {name} | {row['tiles']} | {row['area_mm2']:.4f} | {row['percent_of_tissue']:.1f} |")
    rot = info.get("rotation_check")
    if rot:
        lines += ["", f"Rotation by 90°: the class changes on {rot['tiles_changed']} of {rot['tiles']} tissue tiles "
                      f"({100 * (rot['fraction_changed'] or 0):.1f} %). The grid is {rot['grid']}."]
    return "\n".join(lines) + "\n"


def areas_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["class", "tiles", "area_mm2", "percent_of_tissue"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def geojson(result: SlideMap, predictor: TilePredictor) -> dict:
    """Each predicted tile as a polygon in level-0 pixel coordinates with its class and scores."""
    g = result.grid
    origins = g.origins()[result.tiles] * g.downsample
    side = g.tile * g.downsample
    features = []
    for k in np.flatnonzero(result.done):
        y, x = (float(v) for v in origins[k])
        cls = int(result.classes[k])
        ring = [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]
        measurements = {f"score {n}": float(s) for n, s in zip(result.class_names, result.scores[k])}
        measurements[predictor.uncertainty_name] = float(result.uncertainty[k])
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                         "properties": {"objectType": "tile", "isLocked": True,
                                        "classification": {"name": result.class_names[cls],
                                                           "color": list(class_colour(cls))},
                                        "measurements": measurements}})
    return {"type": "FeatureCollection", "features": features}


def grid_image(result: SlideMap, values: np.ndarray) -> np.ndarray:
    """Per-tile `values` (T,) of the done tissue tiles on the (rows, cols) grid, NaN elsewhere."""
    image = np.full(result.grid.rows * result.grid.cols, np.nan)
    image[result.tiles[result.done]] = values[result.done]
    return image.reshape(result.grid.rows, result.grid.cols)


def plot_maps(result: SlideMap, predictor: TilePredictor, out: Path, title: str) -> None:
    """class_map.png (colours over the thumbnail, legend) and uncertainty.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from eqkernels.store import atomic_file

    thumb = result.info["display"]
    g = result.grid
    scale = g.downsample / result.info["display_downsample"]
    # Cells in thumbnail pixels: stride × stride around each tile's centre (the tile itself when
    # there is no overlap), so overlapping tiles colour the slide without overlapping each other.
    offset = (g.tile - g.stride) / 2 * scale - 0.5
    extent = (offset, offset + g.cols * g.stride * scale, offset + g.rows * g.stride * scale, offset)
    classes = grid_image(result, result.classes.astype(float))
    colours = np.zeros((g.rows, g.cols, 4))
    for i in range(len(result.class_names)):
        colours[classes == i] = (*np.array(class_colour(i)) / 255, 0.55)
    fig, ax = plt.subplots(figsize=(9, 6))
    ax.imshow(thumb)
    ax.imshow(colours, extent=extent, interpolation="nearest")
    ax.set_title(title, fontsize=9, color="red" if not result.complete else "black")
    ax.set_axis_off()
    present = sorted(set(result.classes[result.done].tolist()))
    ax.legend(handles=[Patch(color=np.array(class_colour(i)) / 255, label=result.class_names[i]) for i in present],
              loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, title="class")
    with atomic_file(out / "class_map.png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(9, 6))
    ax.imshow(thumb, alpha=0.5)
    im = ax.imshow(grid_image(result, result.uncertainty), extent=extent, interpolation="nearest", cmap="magma")
    fig.colorbar(im, ax=ax, label=predictor.uncertainty_name, shrink=0.8)
    ax.set_title(title + " — uncertainty", fontsize=9, color="red" if not result.complete else "black")
    ax.set_axis_off()
    with atomic_file(out / "uncertainty.png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
