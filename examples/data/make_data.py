"""Generate the small fine-tuning sample shipped beside this script (no download).

Two tasks the base SmolLM2-135M does not do reliably: rewrite an ISO date as ``DD/MM/YYYY``, and
add or subtract two numbers, answering with the result only. Lines alternate between the two
JSONL formats ``examples/sft.py`` reads: chat ``messages`` (with a system turn on some) and
``prompt`` / ``completion`` pairs.

    python examples/data/make_data.py                       # writes examples/data/sample.jsonl
    python examples/data/make_data.py --n 2000 --out big.jsonl --seed 1
    python examples/data/make_data.py --turns 60 --n 256 --out long.jsonl   # long multi-turn chats

``--turns N`` makes every line one conversation of N question/answer turns (arithmetic), e.g. to
fill sequences of 2048 tokens in a throughput run.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random

HERE = pathlib.Path(__file__).resolve().parent


def date_pair(rng: random.Random) -> tuple[str, str]:
    y, m, d = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
    phrasing = rng.choice(["Rewrite {} as DD/MM/YYYY.", "Convert the date {} to DD/MM/YYYY format.",
                           "Write {} in day/month/year order as DD/MM/YYYY."])
    return phrasing.format(f"{y:04d}-{m:02d}-{d:02d}"), f"{d:02d}/{m:02d}/{y:04d}"


def arith_pair(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    if rng.random() < 0.5:
        return rng.choice(["What is {} + {}?", "Add {} and {}.", "{} plus {} equals?"]).format(a, b), str(a + b)
    return rng.choice(["What is {} - {}?", "Subtract {1} from {0}.", "{} minus {} equals?"]).format(a, b), str(a - b)


def make(n: int, seed: int, turns: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if turns:
            messages = [{"role": "system", "content": "Answer with the number only."}]
            for _ in range(turns):
                q, a = arith_pair(rng)
                messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            rows.append({"messages": messages})
            continue
        q, a = (date_pair if i % 2 == 0 else arith_pair)(rng)
        if i % 4 in (0, 1):
            messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            if i % 8 < 2:
                messages.insert(0, {"role": "system", "content": "Answer with the result only."})
            rows.append({"messages": messages})
        else:
            rows.append({"prompt": f"Question: {q}\nAnswer:", "completion": f" {a}"})
    return rows


def main(argv=None) -> pathlib.Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=400, help="number of lines")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--turns", type=int, default=0, help="N>0: multi-turn arithmetic chats of N turns")
    ap.add_argument("--out", default=str(HERE / "sample.jsonl"))
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for row in make(args.n, args.seed, args.turns):
            f.write(json.dumps(row) + "\n")
    print(f"wrote {args.n} lines to {out}")
    return out


if __name__ == "__main__":
    main()
