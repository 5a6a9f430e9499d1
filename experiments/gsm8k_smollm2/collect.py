"""Copies the small files of a run into the output folder and writes summary.md / .json.

  python collect.py PSM_WORKDIR OUT SEEDS WALL_SECONDS

From PSM_WORKDIR (a `psm.experiment` folder): RESULTS.md, report.json,
experiment.json, plots/, and per seed results.json, config.json, metrics.jsonl,
plots/, per_sample.jsonl.gz and test_predictions.jsonl.gz (checkpoints stay
behind). From OUT: timing.tsv, env.json and yardstick/out.json (if the yardstick
ran). The summary puts psm's training speed beside the yardstick's:

  psm tokens/s     results.json["speed"]["tokens_per_s"]: K * B * T tokens per second
                   (padding included) over the timed steps (compilation and evaluation
                   excluded)
  yardstick tok/s  out.json["train_tok_per_s"]: steps * K * B * T / training wall time
                   (padding included; its first step's compilation included)

and the losses each reports: psm's validation answer loss (held-out training problems,
200 in configs/gsm8k.py) and test accuracy (greedy decoding, exact match); the yardstick's test
answer loss (all test problems). The two loss columns are on different problems,
so compare merges against singles within a column, not across columns.
"""

import gzip
import json
import os
import shutil
import sys

SEED_FILES = ("results.json", "config.json", "metrics.jsonl")
SEED_GZ = ("per_sample.jsonl", "test_predictions.jsonl")
TOP_FILES = ("RESULTS.md", "report.json", "experiment.json")


def _load(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def copy_small(workdir: str, out: str, seeds: int) -> None:
    dest = os.path.join(out, "psm")
    os.makedirs(dest, exist_ok=True)
    for name in TOP_FILES:
        if os.path.exists(os.path.join(workdir, name)):
            shutil.copy2(os.path.join(workdir, name), dest)
    if os.path.isdir(os.path.join(workdir, "plots")):
        shutil.copytree(os.path.join(workdir, "plots"), os.path.join(dest, "plots"),
                        dirs_exist_ok=True)
    for s in range(seeds):
        src, dst = os.path.join(workdir, f"seed{s}"), os.path.join(dest, f"seed{s}")
        os.makedirs(dst, exist_ok=True)
        for name in SEED_FILES:
            if os.path.exists(os.path.join(src, name)):
                shutil.copy2(os.path.join(src, name), dst)
        for name in SEED_GZ:
            if os.path.exists(os.path.join(src, name)):
                with open(os.path.join(src, name), "rb") as fi, \
                        gzip.open(os.path.join(dst, name + ".gz"), "wb") as fo:
                    shutil.copyfileobj(fi, fo)
        if os.path.isdir(os.path.join(src, "plots")):
            shutil.copytree(os.path.join(src, "plots"), os.path.join(dst, "plots"),
                            dirs_exist_ok=True)


def read_timing(out: str) -> list:
    path = os.path.join(out, "timing.tsv")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    return [{"phase": p, "seconds": int(s), "exit": int(rc)} for p, s, rc in rows]


def summarize(workdir: str, out: str, seeds: int, wall: int) -> dict:
    psm_seeds = []
    for s in range(seeds):
        r = _load(os.path.join(workdir, f"seed{s}", "results.json"))
        if r is None:
            continue
        psm_seeds.append({
            "seed": s, "speed": r.get("speed"), "seconds": r.get("seconds"),
            "steps": r.get("steps"),
            "models": {n: {"test_accuracy": m.get("test_accuracy"), "val_loss": m.get("val_loss")}
                       for n, m in r["models"].items()}})
    ys = _load(os.path.join(out, "yardstick", "out.json"))
    yard = None
    if ys is not None:
        yard = {"train_tok_per_s": ys.get("train_tok_per_s"),
                "train_seconds": ys.get("train_seconds"),
                "steps_done": ys.get("steps_done"), "steps_planned": ys.get("steps_planned"),
                "test_loss": {n: m["test_loss"] for n, m in ys.get("models", {}).items()}}
    ratio = None
    if psm_seeds and yard and (psm_seeds[0]["speed"] or {}).get("tokens_per_s") \
            and yard["train_tok_per_s"]:
        ratio = psm_seeds[0]["speed"]["tokens_per_s"] / yard["train_tok_per_s"]
    return {"env": _load(os.path.join(out, "env.json")), "wall_seconds": wall,
            "timing": read_timing(out), "psm": psm_seeds, "yardstick": yard,
            "speed_ratio_psm_over_yardstick": ratio}


def _f(x, fmt):
    return "n/a" if x is None else format(x, fmt)


def to_markdown(s: dict) -> str:
    env = s["env"] or {}
    lines = ["# GSM8K / SmolLM2-135M: run summary", "",
             f"Machine: {env.get('devices')} (jax {env.get('jax')}, backend "
             f"{env.get('backend')}, python {env.get('python')}); whole script "
             f"{s['wall_seconds']} s.", "", "| phase | seconds | exit |", "| --- | --- | --- |"]
    lines += [f"| {t['phase']} | {t['seconds']} | {t['exit']} |" for t in s["timing"]]
    lines += ["", "## Training speed", "",
              "| run | tokens/s (K*B*T, padding incl.) | MFU | step s | train s |",
              "| --- | --- | --- | --- | --- |"]
    for r in s["psm"]:
        sp, sec = r["speed"] or {}, r["seconds"] or {}
        lines.append(f"| psm seed {r['seed']} | {_f(sp.get('tokens_per_s'), ',.0f')} | "
                     f"{_f(sp.get('mfu'), '.3f')} | {_f(sp.get('step_time_s'), '.4f')} | "
                     f"{_f(sec.get('train'), '.1f')} |")
    y = s["yardstick"]
    if y:
        lines.append(f"| yardstick | {_f(y['train_tok_per_s'], ',.0f')} | | | "
                     f"{_f(y['train_seconds'], '.1f')} |")
    lines += ["", f"psm / yardstick tokens/s: {_f(s['speed_ratio_psm_over_yardstick'], '.2f')} "
              "(psm times steps without compilation; the yardstick's time includes its first "
              "step's compilation)", ""]
    if s["psm"]:
        names = list(s["psm"][0]["models"])
        lines += ["## psm models (seed 0)", "", "| model | test accuracy | val answer loss |",
                  "| --- | --- | --- |"]
        for n in names:
            m = s["psm"][0]["models"][n]
            lines.append(f"| {n} | {_f(m['test_accuracy'], '.4f')} | "
                         f"{_f(m['val_loss'], '.4f')} |")
        lines.append("")
    if y:
        lines += ["## Yardstick models", "", "| model | test answer loss |", "| --- | --- |"]
        lines += [f"| {n} | {v:.4f} |" for n, v in y["test_loss"].items()]
        lines += ["", "psm's loss column is on held-out training problems "
                  "(task.num_validation), the yardstick's on the test set: compare merges "
                  "with singles within a column.", ""]
    return "\n".join(lines)


def main(workdir: str, out: str, seeds: int, wall: int) -> int:
    if not os.path.isdir(workdir):
        print(f"error: psm workdir {workdir} is missing", file=sys.stderr)
        return 2
    copy_small(workdir, out, seeds)
    s = summarize(workdir, out, seeds, wall)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(s, f, indent=1)
    md = to_markdown(s)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 5:
        print("usage: python collect.py PSM_WORKDIR OUT SEEDS WALL_SECONDS", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
