"""Fine-tune a Llama-family model on your own JSONL data with jlora, and write files you can serve.

    python examples/sft.py --model path/to/hf-folder --data examples/data/sample.jsonl --out out/sft
    python examples/sft.py --model model.gguf --data my.jsonl --qlora --steps 300 --gguf q8_0
    python examples/sft.py ... --resume              # continue an interrupted run from its checkpoint

The same program is installed as the ``jlora-sft`` command; ``--help`` lists every option. The
implementation (data checks, answer-only loss, length buckets, training, checkpoints, exports)
is ``jlora/models/sft.py``; its module docstring describes the data format and the outputs.
A small sample of chats and prompt/completion pairs is ``examples/data/sample.jsonl``, made by
``examples/data/make_data.py``; ``benchmarks/make_random_checkpoint.py`` makes a random
checkpoint of a real model's shape to measure tokens/s offline.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout

from jlora.models.sft import cli, main  # noqa: E402,F401

if __name__ == "__main__":
    cli()
