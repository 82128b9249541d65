"""Run one configuration over several seeds and report each seed's dev and test weighted F1 with
their mean and standard deviation.

    python seeds.py --seeds 0,1,2 --out runs/demo-seeds -- --demo
    python seeds.py --seeds 0,1,2 --out runs/arm-a -- --config arm-a.json --data data/meld-cache

Everything after `--` is passed to train.py, which runs once per seed with --seed S --out OUT/seed-S
--resume auto: a seed whose run is finished is only read again, a killed one continues where it
stopped, so the same command can be repeated until every seed is done. The table is printed and
written to OUT/seeds.json; its last printed line is that JSON object. The standard deviation is
the sample one (n - 1), as statistics.stdev computes it. Tested by tests/test_settings.py.
"""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import cli


def get_args_parser():
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=cli.str_list, default=["0", "1", "2"], help="comma-separated seeds")
    parser.add_argument("--out", required=True, help="folder of the runs: OUT/seed-S for seed S, and seeds.json")
    parser.add_argument("train_args", nargs="*", help="train.py's arguments, after --")
    return parser


def summary(out, seeds):
    """{"seeds": [...], "<split>": {"values": [...], "mean": m, "sd": s}} of the primary task's weighted
    F1, from each run's test_metrics.json; "partial" lists a capped evaluation's notes
    (--max-eval-batches), so a capped number is never taken for a result."""
    metrics = [json.loads((out / f"seed-{s}" / "test_metrics.json").read_text()) for s in seeds]
    task = next(iter(metrics[0]["dev"]))
    result = dict(seeds=seeds, task=task)
    for split in ("dev", "test"):
        values = [m[split][task]["weighted_f1"] for m in metrics if split in m]
        if values:
            sd = statistics.stdev(values) if len(values) > 1 else float("nan")
            result[split] = dict(values=values, mean=statistics.fmean(values), sd=sd)
        partial = sorted({m[split][task]["partial"] for m in metrics if "partial" in m.get(split, {}).get(task, {})})
        if partial:
            result[split]["partial"] = partial
    return result


def main(argv=None):
    args, unknown = get_args_parser().parse_known_args(argv)
    if unknown:
        raise SystemExit(f"seeds.py: {' '.join(unknown)}: train.py's arguments go after --, as in "
                         "python seeds.py --seeds 0,1,2 --out OUT -- --demo")
    taken = [flag for flag in ("--seed", "--out", "--resume") if any(a.split("=")[0] == flag for a in args.train_args)]
    if taken:
        raise SystemExit(f"seeds.py: {', '.join(taken)} after --: seeds.py sets them for each seed (--seeds, --out)")
    try:
        seeds = [int(s) for s in args.seeds]
    except ValueError:
        raise SystemExit(f"--seeds {','.join(args.seeds)}: give whole numbers, comma-separated") from None
    out = Path(args.out)
    for seed in seeds:
        command = [sys.executable, str(Path(__file__).with_name("train.py")), *args.train_args, "--seed", str(seed),
                   "--out", str(out / f"seed-{seed}"), "--resume", "auto"]
        print(f"seed {seed}: {' '.join(command[1:])}", flush=True)
        if subprocess.run(command, env=os.environ).returncode != 0:
            raise SystemExit(f"seed {seed}: train.py stopped (its message is above); once that is fixed, the same "
                             "command continues: finished seeds are kept (a run of other settings needs another --out)")
    result = summary(out, seeds)
    print(f"\n{result['task']} weighted F1 of the best dev epoch")
    print("seed    dev     test")
    for i, seed in enumerate(seeds):
        print(f"{seed:<6}" + "".join(f"  {result[s]['values'][i]:.4f}" for s in ("dev", "test") if s in result))
    print("mean  " + "".join(f"  {result[s]['mean']:.4f}" for s in ("dev", "test") if s in result))
    print("sd    " + "".join(f"  {result[s]['sd']:.4f}" for s in ("dev", "test") if s in result))
    for split in ("dev", "test"):
        if "partial" in result.get(split, {}):
            print(f"{split}: partial evaluation ({'; '.join(result[split]['partial'])}, --max-eval-batches)")
    cli.write_atomic(out / "seeds.json", json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
