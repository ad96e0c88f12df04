"""`classify_sweep` entry point: a classifier over learning rates x epochs x seeds with parent/child runs (see
`python entrypoints/classify_sweep.py --help`)."""

from finetune_lab.cli import command
from finetune_lab.config import ClassifySweepConfig

main = command(ClassifySweepConfig, "finetune_lab.classify_sweep:run", name="classify_sweep")

if __name__ == "__main__":
    main()
