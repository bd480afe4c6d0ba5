"""
Plot the loss curves of a fine-tune run from the trainer's metrics.jsonl.

Top panel: train loss (every step) and val loss (eval steps, step 0 = before fine-tuning) against step.
Bottom panel, when the log has it: val loss per Dolly category, one thin line each.

Run:
    python model/plot_loss.py logs_finetune/metrics.jsonl    # writes logs_finetune/loss.png
    python model/plot_loss.py logs_finetune                  # the same: a --log_dir means its metrics.jsonl
    python model/plot_loss.py logs_finetune -o run1.pdf      # the format follows the extension: png, jpg, pdf, svg, ...

finetune_dolly.py calls plot_metrics() to refresh {log_dir}/loss.png at each eval. matplotlib is optional:
without it plot_metrics raises PlotError saying how to install it, and training is unaffected.
"""

import argparse
import json
import math
import os
import sys

# -----------------------------------------------------------------------------
# reading metrics.jsonl


class PlotError(Exception):
    """A problem the user can fix (missing or empty metrics file, no matplotlib, unknown image format); printed as
    one line."""


def metrics_file(path):
    """path itself, or path/metrics.jsonl when path is a directory (a fine-tune --log_dir)."""
    if not os.path.isdir(path):
        return path
    metrics_path = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(metrics_path):
        raise PlotError(f"{os.path.join(path, '')} holds no metrics.jsonl; pass a fine-tune --log_dir once its run "
                        f"has started (e.g. logs_finetune), or the metrics.jsonl itself")
    return metrics_path


def read_metrics(metrics_path):
    """Returns the records of metrics.jsonl (or of DIR/metrics.jsonl) sorted by step, one per step.
    Raises PlotError if none can be read."""
    metrics_path = metrics_file(metrics_path)
    if not os.path.isfile(metrics_path):
        raise PlotError(f"{metrics_path}: no such file; pass the metrics.jsonl in a fine-tune --log_dir "
                        f"(e.g. logs_finetune/metrics.jsonl)")
    with open(metrics_path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    by_step = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError,
                OverflowError):  # OverflowError: "step": Infinity
            if lineno == len(lines):
                continue  # the trainer may be writing this line right now
            raise PlotError(f"{metrics_path}:{lineno}: not a metrics record (expected JSON with a 'step'); "
                            f"fix or delete that line") from None
        record["step"] = step  # 2.0 or "2" in a hand-edited log plots as 2
        by_step[step] = record  # a repeated step (a log copied together by hand): the later line wins
    if not by_step:
        raise PlotError(f"{metrics_path}: no metrics yet (empty file); it gets one line per step once training runs")
    return [by_step[s] for s in sorted(by_step)]


def _loss(value):
    """value as a float if it is a finite number, else None (JSON null, NaN, a string or list in a hand-edited log)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:  # an int beyond float range
        return None
    return value if math.isfinite(value) else None


def _points(records, key):
    """(steps, values) of the records that hold a number under key; anything else (null, NaN, ...) is left out."""
    pts = [(r["step"], _loss(r.get(key))) for r in records]
    pts = [(s, v) for s, v in pts if v is not None]
    return [s for s, _ in pts], [v for _, v in pts]


# -----------------------------------------------------------------------------
# the plot


def plot_metrics(metrics_path, out_png=None):
    """Draws metrics_path's train/val loss (and val loss per category, if logged) into out_png, in the format its
    extension names (png, jpg, pdf, svg, ...). metrics_path may be a --log_dir: its metrics.jsonl is read.
    out_png defaults to loss.png beside the metrics file. Returns the path written. Raises PlotError for a
    missing/empty metrics file, an image format matplotlib cannot write, or when matplotlib is not installed."""
    metrics_path = metrics_file(metrics_path)
    records = read_metrics(metrics_path)
    if out_png is None:
        out_png = os.path.join(os.path.dirname(os.path.abspath(metrics_path)), "loss.png")
    try:
        # Figure without pyplot: no global state, no GUI backend; savefig to .png renders with Agg.
        # Safe to call from the training loop at every eval.
        from matplotlib.backend_bases import FigureCanvasBase
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise PlotError("matplotlib is not installed, so no loss plot; `pip install matplotlib` "
                        "(optional: training and metrics.jsonl do not need it)") from None
    fmt = os.path.splitext(out_png)[1][1:].lower()
    formats = FigureCanvasBase.get_supported_filetypes()  # extension -> name: png, jpg, pdf, svg, ...
    if fmt not in formats:  # checked before drawing: nothing is written
        if fmt:
            what = f".{fmt} is not an image format matplotlib writes"
        else:
            what = "no file extension to take the image format from"
        raise PlotError(f"{out_png}: {what}; name the output .png, .jpg, .pdf or .svg "
                        f"(or {', '.join(sorted(formats))})")

    train_steps, train_loss = _points(records, "train_loss")
    val_steps, val_loss = _points(records, "val_loss")
    categories = {}  # category -> (steps, losses), in the order first seen
    for r in records:
        per_category = r.get("val_loss_per_category")
        if not isinstance(per_category, dict):  # absent, or not what the trainer writes (a hand-edited log)
            continue
        for cat, loss in per_category.items():
            steps, losses = categories.setdefault(cat, ([], []))
            if (loss := _loss(loss)) is not None:  # null: no val tokens of that category
                steps.append(r["step"])
                losses.append(loss)
    categories = {c: v for c, v in categories.items() if v[0]}

    fig = Figure(figsize=(9, 8 if categories else 4.5), layout="constrained")
    axes = fig.subplots(2 if categories else 1, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    if train_steps:
        ax.plot(train_steps, train_loss, color="tab:blue", linewidth=1.2, label="train")
    if val_steps:
        best = min(range(len(val_loss)), key=val_loss.__getitem__)
        ax.plot(val_steps, val_loss, color="tab:orange", linewidth=1.8, marker="o", markersize=3,
                label=f"val (best {val_loss[best]:.4f} at step {val_steps[best]})")
        ax.plot([val_steps[best]], [val_loss[best]], marker="*", markersize=12, color="tab:red", linestyle="none")
    if not (train_steps or val_steps):
        ax.text(0.5, 0.5, "no loss values logged yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"fine-tuning loss: {metrics_path}", fontsize="medium")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if train_steps or val_steps:
        ax.legend(loc="upper right", fontsize="small")

    if categories:
        ax = axes[1]
        for cat, (steps, losses) in sorted(categories.items()):
            ax.plot(steps, losses, linewidth=0.9, marker=".", markersize=4, label=cat)
        ax.set_title("val loss per category", fontsize="medium")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="x-small")
    axes[-1].set_xlabel("step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers

    # write to a temp name, then rename: an image viewer refreshing loss.png never sees half a file.
    # The temp name has no image extension, so the format is passed explicitly.
    tmp = f"{out_png}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            fig.savefig(f, format=fmt, dpi=110)
        os.replace(tmp, out_png)
    except OSError as e:
        raise PlotError(f"cannot write {out_png} ({e.strerror or e}); pass a writable path with -o") from None
    except Exception as e:  # a format whose backend lacks an outside tool (.pgf wants LaTeX)
        reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise PlotError(f"cannot write {out_png} as .{fmt} ({reason}); name the output .png, .pdf or .svg") from None
    finally:
        if os.path.exists(tmp):  # gone after a successful rename
            os.remove(tmp)
    return out_png


# -----------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description="Plot train/val loss from a fine-tune run's metrics.jsonl.")
    p.add_argument("metrics", nargs="?", default="logs_finetune/metrics.jsonl",
                   help="metrics.jsonl written by finetune_dolly.py, or the --log_dir holding it")
    p.add_argument("-o", "--output", default=None,
                   help="image to write, in the format its extension names: .png, .jpg, .pdf, .svg, ... "
                        "(default: loss.png beside the metrics file)")
    args = p.parse_args(argv)
    try:
        path = plot_metrics(args.metrics, args.output)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
