"""A development split of the benchmark's train set: the clips of train
identities 110-119 come out of the training shards, and their mp4s + ground
truth are listed in a manifest that `bench/quality.py --val` reads, so
settings are settled on identities the model never saw, not on val.

    python scripts/dev_split.py --shards runs/shards-64 --out-shards runs/shards-64-dev --dev runs/dev
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

DEV_IDS = range(110, 120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", required=True)
    ap.add_argument("--out-shards", required=True)
    ap.add_argument("--dev", required=True, help="folder for the dev manifest")
    ap.add_argument("--train", default=str(Path(__file__).resolve().parents[2] / "shared/benchmark/train"))
    args = ap.parse_args()
    out = Path(args.out_shards)
    out.mkdir(parents=True, exist_ok=True)
    dev = pa.array([str(i) for i in DEV_IDS])
    kept = 0
    for f in sorted(Path(args.shards).glob("shard-*.parquet")):
        t = pq.read_table(f)
        t = t.filter(pc.invert(pc.is_in(t.column("identity"), value_set=dev)))
        kept += t.num_rows
        pq.write_table(t, out / f.name, compression="zstd")
    train = Path(args.train)
    rows = [json.loads(x) for x in (train / "manifest.jsonl").read_text().splitlines()]
    Path(args.dev).mkdir(parents=True, exist_ok=True)
    with open(Path(args.dev) / "manifest.jsonl", "w") as f:
        for r in rows:
            if r["identity_id"] in DEV_IDS:
                f.write(json.dumps(dict(r, video=str(train / r["video"]), meta=str(train / r["meta"]))) + "\n")
    print(json.dumps({"training_clips": kept, "dev_manifest": str(Path(args.dev) / "manifest.jsonl")}))


if __name__ == "__main__":
    main()
