"""`bench` entry point: training speed against the reference baseline (see `python entrypoints/bench.py --help`)."""

from finetune_lab.cli import command
from finetune_lab.config import BenchConfig

main = command(BenchConfig, "finetune_lab.bench:run", name="bench")

if __name__ == "__main__":
    main()
